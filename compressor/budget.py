"""Budgets: the share of MACs or parameters to keep, met within 1 point by searching widths.

Every criterion expresses its opinion as per-group pruning ratios (relative, any scale).
:func:`solve_widths` scales those ratios by bisection until the model's cost lands on the
budget, rounds every width to a multiple of ``round_to``, nudges single groups by one
step to close the rounding gap, and checks the result with Torch-Pruning's own counter
on a pruned copy. An analytic cost model keeps the search cheap: each layer's dense MACs
and parameters (from the counter) scale with the kept share of its input and output
channel groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp

from .errors import BudgetError
from .plan import PruningPlan
from .surgery import PRUNABLE_TYPES, Cost, Graph, count, pruned_copy

METRICS = ("macs", "params")


@dataclass(frozen=True)
class Budget:
    metric: str  # "macs" or "params"
    fraction: float  # share of the dense model's cost to keep
    tolerance: float = 0.01  # absolute, in the kept fraction: 0.25 lands in [0.24, 0.26]

    def __post_init__(self):
        if self.metric not in METRICS:
            raise BudgetError(f"budget metric must be one of {METRICS}, not {self.metric!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise BudgetError(f"a budget is the fraction of {self.metric} to keep, in (0, 1]; got {self.fraction}")

    def __str__(self):
        return f"{self.fraction:.4g} of {self.metric.upper() if self.metric == 'macs' else self.metric}"


class CostModel:
    """MACs and parameters of the model as a function of its group widths."""

    def __init__(self, graph: Graph):
        model, x = graph.model, graph.example_inputs
        was_training = model.training
        model.eval()
        with torch.no_grad():
            macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(model, x[:1], layer_wise=True)
        model.train(was_training)
        self.dense = (float(macs), float(params))
        self.full = graph.widths()
        owners: dict[str, set[str]] = {}
        for g in graph.groups:
            for layer, _side in g.members:
                owners.setdefault(layer, set()).add(g.name)
        # (macs, params, owner groups, multiply?) per leaf layer whose cost depends on widths
        self.terms = []
        fixed_macs, fixed_params = float(macs), float(params)
        for name, module in model.named_modules():
            if list(module.children()) or name not in owners:
                continue
            m, p = float(layer_macs.get(module) or 0), float(layer_params.get(module) or 0)
            fixed_macs -= m
            fixed_params -= p
            self.terms.append((m, p, sorted(owners[name]), isinstance(module, PRUNABLE_TYPES)))
        self.fixed = (fixed_macs, fixed_params)

    def fractions(self, widths: dict[str, int]) -> dict[str, float]:
        macs, params = self.fixed
        for m, p, groups, bilinear in self.terms:
            shares = [widths[g] / self.full[g] for g in groups]
            if bilinear:  # a conv/linear: input share x output share (a depthwise conv has one group)
                factor = 1.0
                for s in shares:
                    factor *= s
            else:  # BN, activations: proportional to channels (mean if reused across groups)
                factor = sum(shares) / len(shares)
            macs += m * factor
            params += p * factor
        return {"macs": macs / self.dense[0], "params": params / self.dense[1]}


def allowed_widths(full: int, round_to: int, max_ratio: float) -> list[int]:
    """Widths a group may take: multiples of round_to, at least (1 - max_ratio) of full, and full itself."""
    floor = full * (1.0 - max_ratio)
    widths = [w for w in range(round_to, full + 1, round_to) if w >= floor - 1e-9]
    if full not in widths:
        widths.append(full)
    return widths


@dataclass
class Solution:
    widths: dict[str, int]
    fraction: float  # measured by Torch-Pruning's counter on a pruned copy
    fractions: dict[str, float]


def solve_widths(
    graph: Graph,
    budget: Budget,
    ratios: dict[str, float] | None = None,
    round_to: int = 8,
    max_ratio: float = 0.95,
) -> Solution:
    """Per-group widths meeting ``budget``, pruning each group roughly in proportion to ``ratios``.

    ``ratios`` defaults to uniform (every group pruned alike, as Li et al.'s L1 baseline).
    Raises :class:`BudgetError` with the reachable range when the budget cannot be met.
    """
    model_cost = CostModel(graph)
    full = model_cost.full
    ratios = {g: 1.0 for g in full} if ratios is None else {g: max(0.0, float(ratios.get(g, 0.0))) for g in full}
    choices = {g: allowed_widths(w, round_to, max_ratio) for g, w in full.items()}

    def frac(widths):
        return model_cost.fractions(widths)[budget.metric]

    def nearest(g, ratio):
        target = full[g] * (1.0 - min(ratio, max_ratio))
        return min(choices[g], key=lambda w: (abs(w - target), -w))

    def at_scale(s):
        return {g: nearest(g, s * ratios[g]) for g in full}

    smallest = {g: min(c) for g, c in choices.items()}
    reachable = frac(smallest)
    if budget.fraction < reachable - budget.tolerance:
        raise BudgetError(
            f"cannot keep only {budget}: with round_to={round_to} and at most {max_ratio:.0%} of any group "
            f"removed, this model reaches [{reachable:.4f}, 1.0] of its {budget.metric}"
        )
    positive = [r for r in ratios.values() if r > 0] or [1.0]
    s_max = max_ratio / min(positive)

    def search(target):
        lo, hi = 0.0, s_max  # frac(at_scale(s)) falls as s grows
        for _ in range(50):
            mid = (lo + hi) / 2
            if frac(at_scale(mid)) > target:
                lo = mid
            else:
                hi = mid
        widths = min((at_scale(lo), at_scale(hi)), key=lambda w: abs(frac(w) - target))
        return _nudge(widths, choices, frac, target, budget.tolerance / 4)

    dense = count(graph.model, graph.example_inputs)
    target, best = budget.fraction, None
    for _ in range(4):  # the analytic model can be off by a little; correct with the real counter
        widths = search(target)
        real = _measure(graph, widths, dense)
        error = real[budget.metric] - budget.fraction
        if best is None or abs(error) < abs(best.fraction - budget.fraction):
            best = Solution(widths, real[budget.metric], real)
        if abs(error) <= budget.tolerance / 2:
            break
        target -= error
    if abs(best.fraction - budget.fraction) > budget.tolerance:
        raise BudgetError(
            f"could not land within {budget.tolerance} of {budget}: best found keeps {best.fraction:.4f} "
            f"(round_to={round_to} is coarse for this model; try a smaller --round-to)"
        )
    return best


def _nudge(widths, choices, frac, target, tolerance):
    """Greedy single-group steps along each group's allowed widths, towards the target."""
    widths = dict(widths)
    error = frac(widths) - target
    while abs(error) > tolerance:
        best_move, best_error = None, error
        for g, options in choices.items():
            i = options.index(widths[g])
            for j in (i - 1, i + 1):
                if 0 <= j < len(options):
                    trial = {**widths, g: options[j]}
                    e = frac(trial) - target
                    if abs(e) < abs(best_error):
                        best_move, best_error = (g, options[j]), e
        if best_move is None:
            break
        widths[best_move[0]] = best_move[1]
        error = best_error
    return widths


def _measure(graph: Graph, widths: dict[str, int], dense: Cost) -> dict[str, float]:
    """Fractions by Torch-Pruning's counter on a pruned copy (which channels go does not matter)."""
    pruned = count(pruned_copy(graph.model, PruningPlan.first_channels(widths), graph.example_inputs), graph.example_inputs)
    return pruned.fraction_of(dense)


