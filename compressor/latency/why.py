"""Why a pruned model is (not) faster: group by group, the MACs removed against the milliseconds saved
on the backend, and whether the kept width sits on a slow step of the measured table.

``compress analyze RUN --latency`` writes ``latency-why.json``, ``latency-why.md`` and
``latency-why.png`` into the run directory. Each group is priced alone (the others at full
width) by the latency model, so the rows say where the time went; the whole pruned model is
also timed, interleaved with the dense one, beside the model's prediction for it.

The rows add up: the groups' savings priced alone, plus the *interaction* between groups (a layer's
time depends on both its input and its output widths, so pruning two neighbours saves less than
the two alone), make the predicted saving of the whole plan exactly; the measured saving differs
from it by the latency model's error, which the report gives beside it.

A kept width is on a *slow step* when, the other groups as the plan has them, a wider width of
its grid is predicted no slower (the backend runs this width badly: keep more channels for
free), or the next narrower grid width saves more than twice the milliseconds per channel of
the group's average (a kernel step just below: a few channels more would buy a large saving).
It is judged beside the plan, not alone: a layer's time depends on its neighbours' widths.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..budget import CostModel
from ..errors import CompressorError
from ..files import write_json, write_text
from .model import LatencyModel
from .spec import LatencySpec


def rows(lat: LatencyModel, widths: dict[str, int]) -> list[dict]:
    """One row per group whose width changed (and every group, if none did)."""
    cost = CostModel(lat.graph)
    full, dense_ms = lat.full, lat.predict_ms(lat.full)
    out = []
    for g in sorted(full, key=lambda g: lat.names.index(g) if g in lat.names else 0):
        w, f = widths[g], full[g]
        alone = {**full, g: w}
        macs_removed = 1.0 - cost.fractions(alone)["macs"]
        saved = dense_ms - lat.predict_ms(alone)
        grid = sorted(lat.grids[g])
        ms_at = {v: lat.predict_ms({**widths, g: v}) for v in grid}  # beside the plan's other groups
        ms_w = lat.predict_ms(widths)
        wider = [v for v in grid if v > w and ms_at[v] <= ms_w + 1e-12]
        narrower = [v for v in grid if v < w]
        per_channel = (ms_at[grid[-1]] - ms_at[grid[0]]) / max(1, grid[-1] - grid[0])
        slow = None
        if wider:
            slow = f"width {max(wider)} is predicted no slower ({ms_at[max(wider)]:.4f} ms vs {ms_w:.4f} ms)"
        elif narrower and per_channel > 0:
            n = max(narrower)
            step = (ms_w - ms_at[n]) / (w - n)
            if step > 2 * per_channel:
                slow = (f"width {n} would save {ms_w - ms_at[n]:.4f} ms more ({step / per_channel:.1f}x the "
                        "group's average per channel)")
        out.append({"group": g, "dense": f, "kept": w, "macs_removed": macs_removed, "ms_saved": saved,
                    "share_of_time_saved": saved / dense_ms if dense_ms else None, "slow_step": slow})
    return out


def account(lat: LatencyModel, widths: dict[str, int], measured_fraction: float) -> dict:
    """The rows, and how they add up to the plan's saving (shares of the dense latency): the groups alone, their
    interaction, the predicted saving (their sum, exactly) and the measured one (off by the model's error)."""
    table = rows(lat, widths)
    predicted = lat.fraction(widths)
    alone = sum(r["share_of_time_saved"] or 0.0 for r in table)
    return {"groups": table, "predicted_fraction": predicted, "measured_fraction": measured_fraction,
            "saved": {"groups_alone": alone, "interaction": (1.0 - predicted) - alone, "predicted": 1.0 - predicted,
                      "measured": 1.0 - measured_fraction, "measured_minus_predicted": predicted - measured_fraction}}


def run_settings(run_dir) -> dict:
    """The run's own settings (metrics.json's config), or {} when it has no readable record."""
    from ..rundir import RunDir

    try:
        return dict(RunDir(Path(run_dir)).record("").config or {})
    except CompressorError:
        return {}


def explain(run_dir, spec: LatencySpec, device: torch.device | None = None, round_to: int = 8,
            max_ratio: float = 0.95, trusted_factories=(), out=None) -> tuple[dict, list[Path]]:
    """The report for a run directory (its dense.pt and pruned.pt), on ``spec``'s backend and batch, written
    to ``out`` (default: the run directory)."""
    from .. import checkpoint, surgery
    from ..rundir import RunDir

    run = RunDir(Path(run_dir))
    for path in (run.dense, run.pruned):
        if not Path(path).is_file():
            raise CompressorError(f"compress analyze --latency needs a finished run directory; no {path}")
    dense, dspec = checkpoint.load(run.dense, with_spec=True, trusted_factories=trusted_factories)
    pruned = checkpoint.load(run.pruned, trusted_factories=trusted_factories)
    graph = surgery.trace(dense.cpu().eval(), dspec.example_inputs())
    lat = LatencyModel(graph, spec, round_to, max_ratio, device)
    widths = lat.widths_of(pruned)
    if widths is None:
        raise CompressorError(f"{run.pruned} does not have {run.dense}'s groups: not a pruned copy of it")
    measured = lat.measure({"pruned": pruned.cpu().eval()})
    cost = surgery.count(pruned, dspec.example_inputs()).fraction_of(surgery.count(dense, dspec.example_inputs()))
    report = {"run": str(run_dir), "backend": spec.backend, "batch": spec.batch, "precision": spec.precision,
              "device": lat.report["device"], "dense_ms": measured["ms"]["dense"],
              "pruned_ms": measured["ms"]["pruned"], "mac_fraction": cost["macs"],
              "model_error": lat.report.get("model_error"), **account(lat, widths, measured["fraction"]["pruned"])}
    folder = Path(out) if out else Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    files = _write(report, folder)
    return report, files


def _write(report: dict, folder: Path) -> list[Path]:
    lines = [f"# Why is it (not) faster? {report['backend']}, batch {report['batch']}, {report['precision']}", "",
             f"Device: {report['device']}. Measured whole, interleaved: dense {report['dense_ms']:.4f} ms, pruned "
             f"{report['pruned_ms']:.4f} ms ({report['measured_fraction']:.3f} of dense; the latency model predicts "
             f"{report['predicted_fraction']:.3f}); MACs kept {report['mac_fraction']:.3f}.", "",
             "Each group priced alone, the others at full width (the latency model):", "",
             "| group | width | MACs removed | ms saved | share of time saved | slow step |",
             "|---|---|---|---|---|---|"]
    for r in report["groups"]:
        lines.append(f"| {r['group']} | {r['dense']} -> {r['kept']} | {r['macs_removed']:.1%} | {r['ms_saved']:.4f} | "
                     f"{(r['share_of_time_saved'] or 0):.1%} | {r['slow_step'] or ''} |")
    s, error = report["saved"], (report.get("model_error") or {}).get("per_layer") or {}
    lines += ["", f"How it adds up (shares of the dense latency): the groups alone save {s['groups_alone']:.1%}; "
              f"their interaction (a layer's time depends on its input and output widths) {s['interaction']:+.1%}; "
              f"predicted saving {s['predicted']:.1%}; measured {s['measured']:.1%} "
              f"({s['measured_minus_predicted']:+.1%} off the prediction"
              + (f"; the model's relative error on random widths: mean {error['mean']:.1%}, max {error['max']:.1%})."
                 if error.get("mean") is not None else ").")]
    paths = [folder / "latency-why.json", folder / "latency-why.md"]
    write_json(paths[0], report)
    write_text(paths[1], "\n".join(lines) + "\n")
    try:
        paths.append(_plot(report, folder / "latency-why.png"))
    except ImportError:
        pass
    return paths


def _plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import atomic_path

    groups = report["groups"]
    names = [r["group"] for r in groups]
    y = range(len(groups))
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(groups) + 1.5))
    ax.barh([i - 0.2 for i in y], [r["macs_removed"] for r in groups], 0.4, label="share of MACs removed")
    ax.barh([i + 0.2 for i in y], [r["share_of_time_saved"] or 0 for r in groups], 0.4,
            label=f"share of time saved ({report['backend']}, batch {report['batch']})")
    for i, r in enumerate(groups):
        if r["slow_step"]:
            ax.annotate("slow step", (max(r["macs_removed"], r["share_of_time_saved"] or 0), i), fontsize=7,
                        xytext=(3, -3), textcoords="offset points")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of the dense model")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
