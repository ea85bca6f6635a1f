"""``compress compare``: methods x budgets x seeds from one dense model, at equal epochs.

A study directory holds ``dense/`` (the shared dense model, an ordinary run directory
unless ``--checkpoint`` gives one) and ``cells/<method>-<metric><fraction>-s<seed>/``, each
an ordinary run directory (``compress export`` and ``bench`` work on it). Every cell starts
from the same dense weights and trains the same number of epochs after them
(``RunConfig.pruning_epochs``: a criterion's own training counts, the rest fine-tunes). A
cell's seed moves everything random after the dense model (criterion, data order,
augmentation); the train/validation split stays the dense model's (``split_seed``), so no
criterion scores on images the dense model trained on.

A cell with ``metrics.json`` is finished and never redone; an interrupted one continues from
its saved progress (``compress run --resume``). ``compare.json``, ``compare.md`` and
``compare.png`` are rewritten after every cell, so a killed study leaves its table so far.
"""
from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import criteria
from .budget import METRICS
from .errors import CompressorError
from .files import atomic_path, read_json_object, write_json, write_text
from .pipeline import RunConfig, field_names, run
from .provenance import stamp
from .record import RunRecord, check_format
from .rundir import RunDir, make_dir

REFERENCE = "l1"  # every method's difference is paired by seed with this one
FLOOR = "random"  # a criterion that ties random channels adds nothing: always a row
SETTINGS = "compare-settings.json"
SETTINGS_FORMAT = "compressor.compare-settings/1"  # a new, renamed or removed shared setting means a new number
CELL_FIX = "delete the cell's folder to run it again"


@dataclass(frozen=True)
class Cell:
    method: str
    metric: str
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.metric}{self.fraction:g}-s{self.seed}"

    @property
    def budget(self) -> str:
        return f"{self.metric}:{self.fraction:g}"


def parse_budgets(text: str) -> list[tuple[str, float]]:
    """``params:0.1,macs:0.25,latency:0.5`` -> [("params", 0.1), ("macs", 0.25), ("latency", 0.5)]; a latency
    fraction is of the dense model's latency measured on ``--latency-backend`` at ``--latency-batch``."""
    from .checks import number

    found = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        metric, sep, value = item.partition(":")
        if not sep or metric not in ("macs", "params", "latency"):
            raise CompressorError(f"--budgets takes metric:fraction items (macs, params or latency), e.g. "
                                  f"params:0.1 or latency:0.5; not {item!r}")
        try:
            fraction = float(value)
        except ValueError:
            raise CompressorError(f"--budgets: {value!r} in {item!r} is not a number") from None
        found.append((metric, number(f"--budgets {metric}", fraction, low=0, high=1, low_open=True)))
    if not found:
        raise CompressorError("--budgets needs at least one metric:fraction, e.g. params:0.1")
    return found


def parse_methods(text: str) -> list[str]:
    """The methods, with the reference (l1) and the random floor added where missing."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in criteria.available()]
    if unknown:
        raise CompressorError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(criteria.available())}")
    added = [m for m in (REFERENCE, FLOOR) if m not in names]
    why = {REFERENCE: "the reference every method is paired with", FLOOR: "the floor a criterion must beat"}
    if added:
        print(f"compare: added {', '.join(f'{m} ({why[m]})' for m in added)}")
    return [m for m in (REFERENCE, FLOOR) if m in added] + list(dict.fromkeys(names))


def parse_seeds(text: str | int) -> list[int]:
    """``3`` -> seeds 0, 1, 2; ``0,5,9`` -> those seeds."""
    text = str(text).strip()
    try:
        seeds = [int(t) for t in text.split(",")] if "," in text else list(range(int(text)))
    except ValueError:
        raise CompressorError(f"--seeds takes a count (3) or a list (0,5,9), not {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise CompressorError(f"--seeds needs at least one seed, none negative or repeated: {text!r}")
    return seeds


def compare(base: RunConfig, methods: list[str], budgets: list[tuple[str, float]], seeds: list[int],
            out: str | Path, configs: dict | None = None, argv: list[str] | None = None) -> dict:
    """Run (or continue) the study in ``out`` and return what ``compare.json`` holds.

    ``configs``: each method's :class:`~compressor.criteria.CriterionConfig` (default: its defaults)."""
    out = Path(out)
    if base.pruning_epochs is None:
        raise CompressorError("compare needs --pruning-epochs: the epochs every cell trains after the dense model")
    if base.budget_metric not in METRICS or base.resume or base.from_scratch:
        raise CompressorError("compare takes its budgets from --budgets, and starts every cell from the dense model")
    base = replace(base, out=None, overwrite=False, argv=[]).validate()
    for method in methods:
        if method not in criteria.available():
            raise CompressorError(f"unknown method {method!r}; available: {', '.join(criteria.available())}")
    configs = {m: (configs or {}).get(m) or criteria.default_config(m) for m in methods}
    cells = [Cell(m, metric, f, s) for metric, f in budgets for m in methods for s in seeds]
    shared = {"format": SETTINGS_FORMAT, **{k: v for k, v in asdict(base).items() if k not in field_names("per_cell")}}
    shared["criteria"] = {m: json.loads(json.dumps(c.to_dict())) for m, c in configs.items()}
    _claim(out, shared)
    for metric, fraction in budgets:  # a latency budget's backend, batch and precision: checked before any work
        replace(base, budget_metric=metric, budget=fraction).validate()
    dense_ckpt, dense = _dense(base, out)
    latency_model = None  # measured when the first unfinished latency cell needs it
    started, done_here, results = time.perf_counter(), [], {}
    for i, cell in enumerate(cells, 1):
        folder = out / "cells" / cell.name
        finished = RunDir(folder).finished()
        t0 = time.perf_counter()
        if cell.metric == "latency" and not finished and latency_model is None:
            latency_model = _latency_model(base, dense_ckpt)
        # the split is the dense model's: its seed (--seed), not the cell's
        record = _cell(replace(base, criterion=configs[cell.method]), cell, folder, dense_ckpt,
                       base.seed if base.split_seed is None else base.split_seed, latency_model)
        results[cell] = record
        if not finished:
            done_here.append(time.perf_counter() - t0)
        left = sum(1 for c in cells[i:] if not RunDir(out / "cells" / c.name).finished())
        eta = statistics.mean(done_here) * left if done_here else 0.0
        print(_progress(i, len(cells), cell, record, finished, eta), flush=True)
        write_study(out, base, methods, budgets, seeds, dense, list(results.values()), argv)
    failed = [r for r in results.values() if r["status"] != "complete"]
    study = write_study(out, base, methods, budgets, seeds, dense, list(results.values()), argv)
    print(f"compare: {len(cells) - len(failed)}/{len(cells)} cells in {time.perf_counter() - started:.0f}s; "
          f"{out / 'compare.md'}")
    if failed:
        raise CompressorError(f"{len(failed)} cell(s) failed ({', '.join(r['cell'] for r in failed)}); see each "
                              "cell's log.txt, and re-run the same command to retry them")
    return study


def _claim(out: Path, shared: dict) -> None:
    """A study directory belongs to one set of shared settings: a re-run continues it, another setting is refused."""
    if out.exists() and not out.is_dir():
        raise CompressorError(f"--out {out} exists and is not a directory")
    path = out / SETTINGS
    if path.is_file():
        saved = read_json_object(path, "a study's settings", "choose another --out")
        check_format(saved, SETTINGS_FORMAT, path, "a study's settings", "choose another --out")
        if not isinstance(saved.get("criteria", {}), dict):
            raise CompressorError(f"{path} does not hold a study's settings; choose another --out")
        differ = [f"--{k.replace('_', '-')} {shared.get(k)!r} (the study has {v!r})" for k, v in saved.items()
                  if shared.get(k) != v and k != "criteria"]
        differ += [f"{m}'s settings {c} (the study has {saved['criteria'][m]})"
                   for m, c in shared["criteria"].items()
                   if m in saved.get("criteria", {}) and saved["criteria"][m] != c]
        if differ:
            raise CompressorError(f"{out} holds a study with other settings; methods, budgets and seeds may change, "
                                  f"these may not: {'; '.join(differ)}. Choose another --out")
        if set(shared["criteria"]) - set(saved.get("criteria", {})):  # a method joins the study: record its settings
            write_json(path, saved | {"criteria": saved.get("criteria", {}) | shared["criteria"]})
        return
    if out.exists() and any(out.iterdir()):
        raise CompressorError(f"{out} is not empty and holds no study ({SETTINGS}); choose another --out")
    make_dir(out)
    write_json(path, shared)


def _quietly(folder: Path):
    """A cell's own output goes to its log.txt: the study prints one line per cell."""
    folder.mkdir(parents=True, exist_ok=True)
    stack = contextlib.ExitStack()
    log = stack.enter_context(open(RunDir(folder).log, "a", buffering=1))
    stack.enter_context(contextlib.redirect_stdout(log))
    stack.enter_context(contextlib.redirect_stderr(log))
    return stack


def _dense(base: RunConfig, out: Path) -> tuple[str, dict]:
    """The shared dense model: ``--checkpoint`` as given, else trained once in ``dense/``."""
    if base.checkpoint:
        if not Path(base.checkpoint).is_file():
            raise CompressorError(f"no checkpoint at {base.checkpoint}")
        return base.checkpoint, {"checkpoint": base.checkpoint}
    folder = out / "dense"
    if not RunDir(folder).finished():
        print(f"compare: training the dense model in {folder} (log: {RunDir(folder).log})", flush=True)
        config = replace(base, method=REFERENCE, budget_metric="params", budget=1.0, finetune_epochs=0,
                         pruning_epochs=None, out=str(folder), resume=True, distill=0.0)
        with _quietly(folder):
            run(config)
    m = RunDir(folder).record(f"delete {folder} to train the dense model again")
    dense = {"run": str(folder), "epochs": m.epochs.dense, "accuracy": asdict(m.accuracy.dense),
             "macs": m.macs.dense, "params": m.params.dense, "seconds": m.seconds.train}
    print(f"compare: dense model {dense['accuracy']['test']:.2%} test accuracy after {dense['epochs']} epochs",
          flush=True)
    return str(RunDir(folder).dense), dense


def _latency_model(base: RunConfig, dense_ckpt: str):
    """One latency model of the dense model for every latency cell (each cell's plan is still measured whole):
    the cells share the table and its calibration, and compare at equal measured latency."""
    from . import checkpoint, latency, surgery

    model, spec = checkpoint.load(dense_ckpt, with_spec=True, trusted_factories=base.trust_factories)
    graph = surgery.trace(model.cpu().eval(), spec.example_inputs())
    lspec = latency.budget_from("latency", 1.0, base.latency_backend, base.latency_batch, base.latency_cache,
                                base.latency_step, base.latency_precision, base.device)
    print(f"compare: measuring the dense model's latency table on {lspec.backend} at batch {lspec.batch} "
          f"({lspec.precision})", flush=True)
    return latency.LatencyModel(graph, lspec, base.round_to, base.max_ratio, _device(base))


def _cell(base: RunConfig, cell: Cell, folder: Path, dense_ckpt: str, split_seed: int, latency_model=None) -> dict:
    config = replace(base, method=cell.method, budget_metric=cell.metric, budget=cell.fraction, seed=cell.seed,
                     split_seed=split_seed, checkpoint=dense_ckpt, epochs=0, out=str(folder), resume=True)
    t0 = time.perf_counter()
    if RunDir(folder).finished():  # finished: read, never redone
        return _fields(cell, RunDir(folder).record(CELL_FIX), folder, 0.0)
    try:
        with _quietly(folder):
            shared = {"latency_model": latency_model} if cell.metric == "latency" else {}
            metrics = run(config, **shared)
    except CompressorError as exc:
        return {"cell": cell.name, "status": "failed", "error": str(exc), **asdict(cell), "run": str(folder)}
    return _record(cell, metrics, folder, time.perf_counter() - t0)


def _record(cell: Cell, m: dict, folder: Path, seconds: float) -> dict:
    """The study's row of a cell whose run returned ``m`` (metrics.json's content)."""
    return _fields(cell, RunRecord.from_json(m, RunDir(folder).metrics, CELL_FIX), folder, seconds)


def _fields(cell: Cell, m: RunRecord, folder: Path, seconds: float) -> dict:
    a = m.accuracy
    return {"cell": cell.name, "status": "complete", **asdict(cell), "run": str(folder),
            "accuracy": {"pruned": a.pruned.test, "finetuned": a.finetuned.test, "finetuned_val": a.finetuned.val},
            "kept": {"macs": m.macs.fraction, "params": m.params.fraction,
                     "latency": (m.latency or {}).get("measured_fraction")}, "widths": m.widths.pruned,
            "epochs": asdict(m.epochs), "seconds": m.seconds.total, "seconds_this_process": seconds,
            "commit": m.versions.get("commit")}


def _progress(i: int, n: int, cell: Cell, r: dict, finished: bool, eta: float) -> str:
    head = f"[{i}/{n}] {cell.method} {cell.budget} seed {cell.seed}:"
    if r["status"] != "complete":
        return f"{head} FAILED ({r['error'][:120]})"
    e = r["epochs"]
    note = " (finished earlier)" if finished else f", {r['seconds_this_process']:.0f}s"
    return (f"{head} {r['accuracy']['finetuned']:.2%} (pruned {r['accuracy']['pruned']:.2%}), kept "
            f"{r['kept'][cell.metric]:.3f} of {cell.metric}, epochs {e['criterion']}+{e['finetune']}{note}; "
            f"ETA {_clock(eta)}")


def _clock(seconds: float) -> str:
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if seconds >= 3600 else f"{seconds / 60:.0f}min"


# statistics ---------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def paired_difference(values: dict[int, float], reference: dict[int, float], level: float = 0.95) -> dict | None:
    """The mean of ``values - reference`` over the seeds both have, with its ``level`` confidence interval
    from the t distribution (n - 1 degrees of freedom); None with fewer than two common seeds."""
    from scipy import stats

    seeds = sorted(set(values) & set(reference))
    if len(seeds) < 2:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = stats.t.ppf(0.5 + level / 2, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    low, high = mean - half, mean + half
    verdict = "better" if low > 0 else "worse" if high < 0 else "tie"
    return {"n": len(diffs), "mean": mean, "std": sd, "low": low, "high": high, "level": level, "verdict": verdict}


def summarize(cells: list[dict], reference: str = REFERENCE) -> list[dict]:
    """Per method and budget: accuracy mean and std over seeds, and the difference from ``reference``."""
    done = [c for c in cells if c["status"] == "complete"]
    rows = []
    for budget in dict.fromkeys((c["metric"], c["fraction"]) for c in done):
        ref = {c["seed"]: c["accuracy"]["finetuned"] for c in done
               if c["method"] == reference and (c["metric"], c["fraction"]) == budget}
        for method in dict.fromkeys(c["method"] for c in done):
            mine = [c for c in done if c["method"] == method and (c["metric"], c["fraction"]) == budget]
            if not mine:
                continue
            acc = {c["seed"]: c["accuracy"]["finetuned"] for c in mine}
            mean, std = mean_std(list(acc.values()))
            pruned_mean, pruned_std = mean_std([c["accuracy"]["pruned"] for c in mine])
            rows.append({
                "method": method, "metric": budget[0], "fraction": budget[1], "seeds": sorted(acc),
                "accuracy": {"mean": mean, "std": std}, "pruned_accuracy": {"mean": pruned_mean, "std": pruned_std},
                "kept": {k: _mean_of(c["kept"].get(k) for c in mine) for k in ("macs", "params", "latency")},
                "epochs": sorted({(c["epochs"]["criterion"], c["epochs"]["finetune"]) for c in mine}),
                "seconds": statistics.mean(c["seconds"] for c in mine),
                "vs_reference": None if method == reference else paired_difference(acc, ref),
            })
    return rows


def _mean_of(values) -> float | None:
    """The mean of the values that are there (a kept latency is measured for latency cells only)."""
    found = [v for v in values if v is not None]
    return statistics.mean(found) if found else None


# outputs ------------------------------------------------------------------------------------

def write_study(out: Path, base: RunConfig, methods, budgets, seeds, dense: dict, cells: list[dict],
                argv: list[str] | None) -> dict:
    rows = summarize(cells)
    study = {"format": "compressor.compare/1", **stamp(argv, _device(base)), "model": base.model,
        "dataset": base.dataset, "methods": methods, "budgets": [list(b) for b in budgets],
        "seeds": seeds, "pruning_epochs": base.pruning_epochs, "reference": REFERENCE, "dense": dense,
        "settings": {k: v for k, v in asdict(base).items() if k != "argv"}, "summary": rows, "cells": cells}
    write_json(out / "compare.json", study)
    write_text(out / "compare.md", markdown(study))
    plot(study, out / "compare.png")
    return study


def _device(base: RunConfig):
    from .train import pick_device

    return pick_device(base.device)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown(study: dict) -> str:
    d, cells = study["dense"], study["cells"]
    ran_at = ", ".join(sorted({c["commit"] for c in cells if c.get("commit")})) or "none yet"  # not a cell that failed
    lines = [f"# compare: {study['model']} on {study['dataset']}", "",
             f"- command: `{' '.join(study['command'] or ['(Python API)'])}`",
             f"- commit {study['commit']} (cells ran at {ran_at}), "
             f"{study['device']}, {study['date']}",
             f"- dense model: {d.get('run') or d.get('checkpoint')}"
             + (f", {_pct(d['accuracy']['test'])}% test accuracy after {d['epochs']} epochs"
                if "accuracy" in d else ""),
             f"- every cell: {study['pruning_epochs']} epochs after the dense model (criterion's own + fine-tuning); "
             f"seeds {', '.join(map(str, study['seeds']))}",
             f"- accuracy: top-1 on the test split after fine-tuning, mean ± std over seeds (percent); "
             f"Δ vs {study['reference']}: paired by seed, 95% CI from the t distribution; a method is better or "
             "worse only where the interval excludes 0", "",
             "| budget | method | seeds | kept MACs | kept params | kept latency (measured) | epochs "
             f"(criterion+fine-tune) | before fine-tune | accuracy | Δ vs {study['reference']} [95% CI] | verdict "
             "| seconds/cell |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in study["summary"]:
        a, p, v = r["accuracy"], r["pruned_accuracy"], r["vs_reference"]
        epochs = ", ".join(f"{c}+{f}" for c, f in r["epochs"])
        delta = "(reference)" if r["method"] == study["reference"] else "n < 2" if v is None else (
            f"{100 * v['mean']:+.2f} [{100 * v['low']:+.2f}, {100 * v['high']:+.2f}]")
        verdict = "" if v is None else v["verdict"]
        lines.append(f"| {r['metric']}:{r['fraction']:g} | {r['method']} | {len(r['seeds'])} | "
                     f"{r['kept']['macs']:.3f} | {r['kept']['params']:.3f} | "
                     f"{'-' if r['kept'].get('latency') is None else format(r['kept']['latency'], '.3f')} | {epochs} | "
                     f"{_pct(p['mean'])} ± {_pct(p['std'])} | {_pct(a['mean'])} ± {_pct(a['std'])} | {delta} | "
                     f"{verdict} | {r['seconds']:.0f} |")
    failed = [c for c in study["cells"] if c["status"] != "complete"]
    if failed:
        lines += ["", "Failed cells (re-run the command to retry):", *[f"- {c['cell']}: {c['error']}" for c in failed]]
    return "\n".join(lines) + "\n"


def plot(study: dict, path: Path) -> None:
    """Accuracy against the kept fraction, one line per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in study["summary"])) or ["params"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method in dict.fromkeys(r["method"] for r in study["summary"]):
            rows = sorted((r for r in study["summary"] if r["method"] == method and r["metric"] == metric),
                          key=lambda r: r["kept"][metric])
            if rows:
                ax.errorbar([r["kept"][metric] for r in rows], [100 * r["accuracy"]["mean"] for r in rows],
                            yerr=[100 * (r["accuracy"]["std"] or 0) for r in rows], marker="o", capsize=3,
                            label=method)
        ax.set(xlabel=f"kept fraction of {metric}", ylabel="test accuracy after fine-tuning (%)",
               title=f"{study['model']} / {study['dataset']}: mean ± std over {len(study['seeds'])} seed(s)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


__all__ = ["compare", "summarize", "paired_difference", "parse_budgets", "parse_methods", "parse_seeds"]

