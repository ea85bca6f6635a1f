"""Sensitivity: layer sensitiveness measured by damage (our reading of the seed paper).

Analysis: for each prunable group, one at a time, damage it on purpose and measure the
validation accuracy (never the test set). ``zero`` damage zeroes the group's lowest-L1
filters at each level (25/50/75% by default): the conv/linear rows, their biases and
the coupled BatchNorm scales and shifts, which is exactly what pruning those channels
would do. ``noise`` damage adds Gaussian noise of ``level`` x the layer's weight std to
the group's filters. A group's sensitiveness is its mean accuracy drop over the levels.

Allocation (details the paper does not give, chosen here): a group's pruning ratio is
proportional to 1 / (sensitiveness + 0.01), so an accuracy drop of one point is the
scale below which groups count as equally robust; the solver scales the ratios by
bisection to the budget and caps each at ``--max-ratio``. Inside a group, filters go by
L1 norm.

Multi-step (``--steps N``; by default 2, or 1 under a latency budget, see ``steps_for``):
prune a working copy to part of the budget, fine-tune it ``--step-epochs``, re-analyse,
repeat; the kept channels are tracked back to the original indices, and the final plan
applies to the original model (the intermediate fine-tuning informs the selection). The
copy's trained weights are then written into the kept positions of the original model
(``surgery.write_back``), so the training between steps is not lost: the pruned result
equals the trained copy, and the pipeline's fine-tuning goes on from it. ``--step-epochs 0``
re-analyses without training in between.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import distributed
from ..budget import solve_widths
from ..checks import number
from ..data import ImageData
from ..data import batches as data_batches
from ..errors import CompressorError
from ..plan import PruningPlan
from ..surgery import Graph, apply, count, trace, write_back
from ..train import accuracy, fit
from . import CriterionConfig, PlanRequest, option, register, train_config
from .baselines import filter_l1
from .masking import carriers

LEVELS = (0.25, 0.5, 0.75)
MODES = ("zero", "noise")
ROBUST_SCALE = 0.01
LATENCY_METRICS = ("latency", "latency_ms")


def parse_levels(text: str) -> tuple[float, ...]:
    """``"0.25,0.5"`` -> (0.25, 0.5), or one clear error."""
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise CompressorError(f"--levels takes numbers separated by commas, not {text!r}") from None


@dataclass(frozen=True)
class SensitivityConfig(CriterionConfig):
    """Layer sensitiveness by damage: how much each group's damage costs in validation accuracy."""

    levels: tuple = option(LEVELS, "damage levels (share of filters zeroed, or noise scale), e.g. 0.25,0.5",
                           flag="--levels")
    damage: str = option("zero", "zero lowest-L1 filters, or add noise", flag="--damage", choices=MODES)
    steps: int | None = option(None, "prune / analyse steps (each analyses the model pruned so far)", flag="--steps",
                               integer=True, low=1, optional=True, shown_default="2, or 1 under a latency budget")
    step_epochs: int = option(1, "training epochs between steps", flag="--step-epochs", integer=True, low=0)

    def check(self):
        levels = parse_levels(self.levels) if isinstance(self.levels, str) else self.levels
        if not isinstance(levels, (tuple, list)):
            raise CompressorError(f"--levels takes numbers separated by commas, not {levels!r}")
        if not levels:
            raise CompressorError("--levels needs at least one damage level in (0, 1)")
        for level in levels:
            number("--levels", level, low=0, high=1, low_open=True, high_open=True)
        object.__setattr__(self, "levels", tuple(float(v) for v in levels))

    def steps_for(self, metric: str) -> int:
        """``--steps``, or by default 2 steps (1 under a latency budget). Why 2: at equal epochs on Conv-4 /
        CIFAR-10 (3 seeds), one step fell below L1 at 10% and 5% of params, two steps tied it at both
        (benchmarks/results/cpu-cifar10-conv4-sensitivity-one-step.md). A latency budget needs one step."""
        if self.steps is not None:
            return self.steps
        return 1 if metric in LATENCY_METRICS else 2

    def check_budget(self, metric: str) -> None:
        if metric in LATENCY_METRICS and self.steps_for(metric) > 1:
            raise CompressorError("a latency budget works with sensitivity in one step; multi-step --steps prunes "
                                  "a copy between steps, which the latency table does not follow")


def _damage(graph: Graph, group, level: float, mode: str,
            generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Damage ``group`` in place; returns (tensor, saved copy) pairs to restore it."""
    saved = []
    if mode == "zero":
        n = int(round(group.width * level))
        idx = torch.argsort(filter_l1(graph, [group])[group.name])[:n]
        for c in carriers(graph, group):  # the group's rows only, in a layer wider than the group
            saved.append((c.tensor, c.tensor.detach().clone()))
            c.tensor.data[c.index[idx.to(c.index.device)]] = 0
    else:
        for c in carriers(graph, group):
            w = c.tensor
            if w is not c.module.weight:
                continue
            saved.append((w, w.detach().clone()))
            noise = torch.randn((len(c.index), *w.shape[1:]), generator=generator).to(w.device, w.dtype)
            w.data[c.index] += noise * (level * w.detach().float().std())
    return saved


def analyze(model: nn.Module, graph: Graph, data: ImageData, device: torch.device, levels=LEVELS, mode: str = "zero",
            batch_size: int = 1024, seed: int = 0) -> dict:
    """Accuracy on the validation split with each group damaged at each level, one at a time."""
    if mode not in MODES:
        raise CompressorError(f"sensitivity damage must be one of {', '.join(MODES)}, not {mode!r}")
    if len(data.val_y) == 0:
        raise CompressorError("sensitivity analysis needs a validation split (--val-fraction > 0)")
    if not levels or not all(0.0 < lv < 1.0 for lv in levels):
        raise CompressorError(f"damage levels must lie in (0, 1), got {list(levels)}")
    batches = data_batches(data, "val", batch_size, device)  # in memory: on the device once
    base = accuracy(model, batches, device)
    rows = []
    # Under torchrun the ranks split the groups and share their rows; each group's noise has its own seed,
    # so the result does not depend on the number of ranks.
    share = range(len(graph.groups))[distributed.shard(len(graph.groups))]
    with torch.no_grad():
        for i in share:
            group = graph.groups[i]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
            for level in levels:
                saved = _damage(graph, group, level, mode, generator)
                acc = accuracy(model, batches, device, local=True)
                for t, copy_ in saved:
                    t.data.copy_(copy_)
                rows.append({"group": group.name, "width": group.width, "level": level, "mode": mode,
                             "accuracy": acc, "drop": base - acc})
    rows = [r for part in distributed.all_gather(rows) for r in part]
    sensitiveness = {g.name: sum(r["drop"] for r in rows if r["group"] == g.name) / len(levels) for g in graph.groups}
    return {"base_accuracy": base, "mode": mode, "levels": list(levels), "rows": rows, "sensitiveness": sensitiveness}


def ratios_from(sensitiveness: dict[str, float]) -> dict[str, float]:
    """Less sensitive -> pruned more: ratio proportional to 1 / (sensitiveness + 0.01)."""
    return {g: 1.0 / (max(s, 0.0) + ROBUST_SCALE) for g, s in sensitiveness.items()}


def _record(request: PlanRequest, first: dict, steps: list | None = None) -> None:
    request.report["sensitivity"] = {"base_accuracy": first["base_accuracy"], "sensitiveness": first["sensitiveness"],
                                     "ratios": ratios_from(first["sensitiveness"])}
    if steps:
        request.report["sensitivity"]["steps"] = [a["sensitiveness"] for a in steps]
    if request.out_dir is not None:
        write_analysis(first, request.out_dir)


def _plan(graph, analysis, budget, request) -> PruningPlan:
    widths = solve_widths(graph, budget, ratios_from(analysis["sensitiveness"]), request.round_to,
                          request.max_ratio).widths
    return PruningPlan.from_scores(filter_l1(graph), widths, graph)  # graph: legal sets (grouped convs)


@register("sensitivity", config=SensitivityConfig)
def sensitivity(request: PlanRequest, config: SensitivityConfig) -> PruningPlan:
    if request.data is None:
        raise CompressorError("the sensitivity criterion needs data (a validation split)")
    levels, mode, step_epochs = config.levels, config.damage, config.step_epochs
    steps = config.steps_for(request.budget.metric)
    graph = request.traced()
    if steps == 1:
        analysis = analyze(request.model, graph, request.data, request.device, levels, mode, seed=request.seed)
        _record(request, analysis)
        return _plan(graph, analysis, request.budget, request)

    work = copy.deepcopy(request.model)
    x = request.example_inputs
    dense = count(work, x)
    origin = {g.name: list(range(g.width)) for g in graph.groups}  # current index -> original index
    analyses = []
    for step in range(1, steps + 1):
        work_graph = trace(work, x)
        analysis = analyze(work, work_graph, request.data, request.device, levels, mode, seed=request.seed + step)
        analyses.append(analysis)
        kept_target = 1.0 - (1.0 - request.budget.fraction) * step / steps  # of the original model
        current = getattr(count(work, x), request.budget.metric) / getattr(dense, request.budget.metric)
        relative = min(1.0, kept_target / current)
        # intermediate steps only need to be roughly on the way; the last one must meet the budget
        tolerance = request.budget.tolerance / current if step == steps else 0.05
        plan = _plan(work_graph, analysis, request.budget.step(relative, tolerance), request)
        origin = {g: [origin[g][i] for i in plan.keep.get(g, range(len(origin[g])))] for g in origin}
        apply(work, plan, x, graph=work_graph)
        if step < steps and step_epochs:
            fit(work, request.data, train_config(request, step_epochs, request.seed + step), request.device,
                desc=f"step {step}", state=request.stage(f"sensitivity-step{step}"))
    _record(request, analyses[0], analyses)
    plan = PruningPlan({g: idx for g, idx in origin.items()})
    if step_epochs:  # the steps' training carries on into the result, as every other criterion's does
        write_back(request.model, work, plan, x)
    request.train_epochs = (steps - 1) * step_epochs
    return plan


def analyze_source(source, config: SensitivityConfig | None = None, data_dir=None, device="auto",
                   val_fraction: float = 0.1, seed: int = 0, out=None, trusted_factories=()) -> tuple[dict, list]:
    """``compress analyze``: the sensitivity table and plot of a trained model (a run directory's dense.pt, or
    a checkpoint), on the validation split that ``val_fraction`` and ``seed`` cut (the run's own, to stay off
    its training images). Returns the analysis and the files written (next to the source, or in ``out``)."""
    from pathlib import Path

    from .. import checkpoint, surgery
    from .. import data as datasets
    from ..rundir import RunDir
    from ..train import pick_device

    config = config or SensitivityConfig()
    number("--val-fraction", val_fraction, low=0, high=1, high_open=True)
    number("--seed", seed, integer=True, low=0, high=2**32 - 1)
    source = Path(source)
    ckpt = RunDir(source).dense if source.is_dir() else source
    model, spec = checkpoint.load(ckpt, with_spec=True, trusted_factories=trusted_factories)
    data = datasets.load(spec.dataset, data_dir, val_fraction, seed)
    device = pick_device(device)
    model.to(device)
    graph = surgery.trace(model, data.example_inputs(device=device))
    analysis = analyze(model, graph, data, device, config.levels, config.damage, seed=seed)
    folder = Path(out) if out else (source if source.is_dir() else ckpt.parent)
    return analysis, write_analysis(analysis, folder)


def write_analysis(analysis: dict, out_dir) -> list:
    """sensitivity.json, sensitivity.csv and sensitivity.png (accuracy vs damage, one curve per group)."""
    import csv
    import io
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import atomic_path, write_json, write_text

    out_dir = Path(out_dir)
    write_json(out_dir / "sensitivity.json", analysis)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["group", "width", "level", "mode", "accuracy", "drop"])
    writer.writeheader()
    writer.writerows(analysis["rows"])
    write_text(out_dir / "sensitivity.csv", buf.getvalue())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in analysis["sensitiveness"]:
        pts = [(0.0, analysis["base_accuracy"])] + [(r["level"], r["accuracy"]) for r in analysis["rows"]
                                                    if r["group"] == name]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set(xlabel=f"damage level ({analysis['mode']})", ylabel="validation accuracy",
           title="Sensitivity: accuracy vs damage, one group at a time")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(out_dir / "sensitivity.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return [out_dir / n for n in ("sensitivity.json", "sensitivity.csv", "sensitivity.png")]
