"""Budgets: the share of MACs or parameters to keep, met within 1 point by searching widths.

Every criterion expresses its opinion as per-group pruning ratios (relative, any scale).
:func:`solve_widths` scales those ratios by bisection until the model's cost lands on the
budget, rounds every width to a multiple of ``round_to``, nudges single groups by one
step to close the rounding gap, and checks the result with Torch-Pruning's own counter
on a pruned copy. An analytic cost model keeps the search cheap: each layer's dense MACs
and parameters (from the counter) scale with the kept share of its input and output
channel groups.

A ``latency`` budget (measured time on a backend) carries its cost model: a
:class:`LatencyCost`, defined here and implemented by :class:`compressor.latency.LatencyModel`
(a measured per-layer lookup table), which prices widths, offers only widths on its grid, and
checks the result by timing the whole pruned model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch_pruning as tp

from .errors import BudgetError
from .plan import PruningPlan
from .surgery import PRUNABLE_TYPES, Cost, Graph, count, pruned_copy

METRICS = ("macs", "params", "latency")
LATENCY_TOLERANCE = 0.10  # a latency budget's plan must measure within 10% of its target (relative)
LATENCY_AIM = 0.5  # a latency plan is accepted at once within this share of the tolerance (the rest: timing noise)


class LatencyCost(Protocol):
    """What a latency budget needs from its cost model (``compressor.latency.LatencyModel``): it prices
    group widths of one traced graph as a fraction of the dense latency, narrows each group's widths to
    those worth choosing, and solves (measuring the result) given the bisection ``search``."""

    spec: object  # what is measured and where (backend, batch, ...): for messages

    def check_prices(self, graph: Graph) -> None: ...

    def fraction(self, widths: dict[str, int]) -> float: ...

    def on_grid(self, allowed: dict[str, list[int]]) -> dict[str, list[int]]: ...  # the widths it measured

    def choices(self, allowed: dict[str, list[int]], context: dict[str, int] | None = None) -> dict[str, list[int]]: ...

    def solve(self, budget: "Budget", search, choices: dict[str, list[int]]) -> tuple[dict[str, int], dict]: ...

    def measure(self, configs: dict) -> dict: ...  # whole models at these widths, timed against the dense one


@dataclass(frozen=True)
class Budget:
    metric: str  # "macs", "params" or "latency"
    fraction: float  # share of the dense model's cost to keep
    tolerance: float = 0.01  # absolute, in the kept fraction: 0.25 lands in [0.24, 0.26]
    # latency: the cost model a latency budget is met with (compressor.latency.prepare builds it); a
    # criterion's step budget keeps it: dataclasses.replace(budget, fraction=..., tolerance=...)
    latency: LatencyCost | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.metric not in METRICS:
            raise BudgetError(f"budget metric must be one of {METRICS}, not {self.metric!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise BudgetError(f"a budget is the fraction of {self.metric} to keep, in (0, 1]; got {self.fraction}")
        if self.metric == "latency" and self.tolerance == 0.01:  # the default: relative for measured time
            object.__setattr__(self, "tolerance", LATENCY_TOLERANCE * self.fraction)

    def __str__(self):
        spec = getattr(self.latency, "spec", None)
        if self.metric == "latency" and spec is not None:
            return f"{self.fraction:.4g} of latency ({spec.backend}, batch {spec.batch})"
        return f"{self.fraction:.4g} of {self.metric.upper() if self.metric == 'macs' else self.metric}"

    def step(self, fraction: float, tolerance: float | None = None) -> "Budget":
        """The same kind of budget (its latency model included) at another fraction: a criterion's step.
        Without ``tolerance``, the default for that fraction (relative for latency)."""
        return Budget(self.metric, fraction, 0.01 if tolerance is None else tolerance, self.latency)


class CostModel:
    """MACs and parameters (and latency, given a latency cost model) as a function of group widths."""

    def __init__(self, graph: Graph, latency: LatencyCost | None = None):
        if latency is not None:
            latency_cost(Budget("latency", 1.0, latency=latency), graph)  # a model, and this graph's
        self.latency = latency  # criteria that read fractions()["latency"] get the measured model
        model, x = graph.model, graph.example_inputs
        was_training = model.training
        model.eval()
        with torch.no_grad():
            macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(model, x[:1], layer_wise=True)
        model.train(was_training)
        self.dense = (float(macs), float(params))
        self.full = graph.widths()
        sides: dict[str, dict[str, set[str]]] = {}  # layer -> {"out": groups, "in": groups}
        for g in graph.groups:
            for layer, side in g.members:
                sides.setdefault(layer, {"out": set(), "in": set()})[side].add(g.name)
        # (macs, params, output groups, input groups, is conv/linear) per leaf layer whose cost depends on widths
        self.terms = []
        fixed_macs, fixed_params = float(macs), float(params)
        for name, module in model.named_modules():
            if list(module.children()) or name not in sides:
                continue
            m, p = float(layer_macs.get(module) or 0), float(layer_params.get(module) or 0)
            fixed_macs -= m
            fixed_params -= p
            self.terms.append((m, p, sorted(sides[name]["out"]), sorted(sides[name]["in"] - sides[name]["out"]),
                               isinstance(module, PRUNABLE_TYPES)))
        self.fixed = (fixed_macs, fixed_params)

    def _share(self, groups, widths) -> float:
        """Kept share of a tensor whose channels are the concatenation of ``groups``."""
        return sum(widths[g] for g in groups) / sum(self.full[g] for g in groups) if groups else 1.0

    def fractions(self, widths: dict[str, int]) -> dict[str, float]:
        macs, params = self.fixed
        for m, p, outs, ins, prunable in self.terms:
            if prunable:  # conv/linear: output share x input share (a depthwise conv's input is its output group)
                factor = self._share(outs, widths) * self._share(ins, widths)
            else:  # BN, activations: proportional to their channels
                factor = self._share(outs or ins, widths)
            macs += m * factor
            params += p * factor
        found = {"macs": macs / self.dense[0], "params": params / self.dense[1]}
        if self.latency is not None:
            found["latency"] = self.latency.fraction(widths)
        return found


def latency_cost(budget: Budget, graph: Graph) -> LatencyCost | None:
    """A latency budget's cost model, checked against ``graph``; None for other budgets."""
    if budget.metric != "latency":
        return None
    if budget.latency is None:
        raise BudgetError("a latency budget needs its latency model: compressor.latency.prepare(spec, graph) "
                          "builds the Budget (or Budget('latency', F, latency=LatencyModel(graph, spec)))")
    if not callable(getattr(budget.latency, "check_prices", None)):
        raise BudgetError(f"Budget.latency is the latency model that prices the widths, not a "
                          f"{type(budget.latency).__name__}: compressor.latency.prepare(spec, graph) builds the "
                          "Budget from a LatencySpec")
    budget.latency.check_prices(graph)
    return budget.latency


def allowed_widths(full: int, round_to: int, max_ratio: float, group=None) -> list[int]:
    """Widths a group may take: multiples of round_to, at least (1 - max_ratio) of full, and full itself.

    With the traced ``group`` (surgery.Group), only widths its grouped convs allow
    (``group.legal_widths()``, e.g. multiples of the conv's groups): multiples of the lcm
    with round_to. When none fits, the group stays at full width.
    """
    floor = full * (1.0 - max_ratio)
    legal = group.legal_widths() if group is not None else range(round_to, full + 1, round_to)
    widths = [w for w in legal if w % round_to == 0 and w >= floor - 1e-9]
    if full not in widths:
        widths.append(full)
    return widths


def allowed_choices(graph: Graph, round_to: int, max_ratio: float,
                    floors: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Each group's allowed widths (see :func:`allowed_widths`), none below its floor (full width is always left)."""
    floors = floors or {}
    choices = {}
    for g in graph.groups:
        widths = allowed_widths(g.width, round_to, max_ratio, g)
        choices[g.name] = [w for w in widths if w >= floors.get(g.name, 0)] or [g.width]
    return choices


def global_widths(graph: Graph, scores: dict[str, torch.Tensor], budget: Budget, round_to: int, max_ratio: float,
                  floors: dict[str, int] | None = None, normalise: bool = True) -> dict[str, int]:
    """Widths from one threshold over every group's channel scores: the lowest threshold whose widths meet
    the budget, so the most channels stay (Torch-Pruning's "global pruning").

    ``normalise`` divides each group's scores by their mean first: raw scores of different layers (BN
    scales, filter norms) live on different scales, and one raw threshold starves the layers whose
    scores happen to be small. ``floors``: least widths, as in :func:`solve_widths`.
    """
    cost = CostModel(graph, latency_cost(budget, graph))
    choices = allowed_choices(graph, round_to, max_ratio, floors)
    if normalise:
        scores = {g: s.float() / s.float().mean().clamp_min(1e-12) for g, s in scores.items()}

    def widths_at(t):
        found = {}
        for name, s in scores.items():
            need = int((s > t).sum())
            found[name] = min([w for w in choices[name] if w >= need] or [max(choices[name])])
        return found

    candidates = torch.cat([s.flatten().float() for s in scores.values()]).sort().values
    lo, hi = 0, len(candidates) - 1  # widths shrink as the threshold index grows
    while lo < hi:
        mid = (lo + hi) // 2
        if cost.fractions(widths_at(candidates[mid]))[budget.metric] <= budget.fraction:
            hi = mid
        else:
            lo = mid + 1
    return widths_at(candidates[lo])


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
    floors: dict[str, int] | None = None,
) -> Solution:
    """Per-group widths meeting ``budget``, pruning each group roughly in proportion to ``ratios``.

    ``ratios`` defaults to uniform (every group pruned alike, as Li et al.'s L1 baseline).
    ``floors`` are the least widths some groups may take (a criterion that must not starve a layer).
    Raises :class:`BudgetError` with the reachable range when the budget cannot be met.
    """
    model_cost = CostModel(graph)
    full = model_cost.full
    ratios = {g: 1.0 for g in full} if ratios is None else {g: max(0.0, float(ratios.get(g, 0.0))) for g in full}
    choices = allowed_choices(graph, round_to, max_ratio, floors)
    lat = latency_cost(budget, graph)
    if lat is not None:  # the widths the latency table measured (plans() drops the slow ones)
        choices = lat.on_grid(choices)

    def frac(widths):
        return lat.fraction(widths) if lat is not None else model_cost.fractions(widths)[budget.metric]

    def ideal(s):
        return {g: full[g] * (1.0 - min(s * ratios[g], max_ratio)) for g in full}

    def holding(plan_of):
        """``plan_of(picks)``, solved again without the widths that run no faster than a wider one beside the
        plan found (a layer's time depends on its neighbours' widths), until the plan keeps none of them; the
        dropped widths stay dropped, so this ends."""
        picks = choices
        while True:
            widths = plan_of(picks)
            fast = lat.choices(picks, context=widths)
            if all(widths[g] in fast[g] for g in full):
                return widths
            picks = fast

    def plans(plan_of):
        """Under a latency budget, two plans: the slow widths judged beside dense neighbours (once), and beside
        the plan found (:func:`holding`). Neither wins everywhere: beside dense neighbours, ResNet-20's first-stage
        convs look no faster narrow, so that plan keeps them whole and cuts the residual streams to 4 of 32;
        beside the plan, Conv-4's int8 table drops so many widths that a layer falls to 4 of 64. The caller
        keeps the plan with more weights (:func:`kept`)."""
        if lat is None:
            return [plan_of(choices)]
        return [plan_of(lat.choices(choices)), holding(plan_of)]

    def kept(widths):  # at equal latency, the plan keeping more weights keeps more of the network's capacity
        return model_cost.fractions(widths)["params"]

    floor = min(plans(lambda picks: {g: min(c) for g, c in picks.items()}), key=frac)
    reachable, predicted = frac(floor), ""
    if budget.fraction < reachable - budget.tolerance and lat is not None:
        # the model can misprice its own floor (ResNet-20 in int8: 0.56 predicted, 0.49 measured for a plan
        # above it): the narrowest plan is timed whole, and the solve below corrects its aim by the miss
        predicted = f" (measured whole; the latency model predicted {reachable:.4f})"
        reachable = lat.check(floor)["fraction"]
    if budget.fraction < reachable - budget.tolerance:
        raise BudgetError(
            f"cannot keep only {budget}: with round_to={round_to} and at most {max_ratio:.0%} of any group "
            f"removed, this model reaches [{reachable:.4f}, 1.0] of its {budget.metric}{predicted}"
        )
    positive = [r for r in ratios.values() if r > 0] or [1.0]
    s_max = max_ratio / min(positive)

    def scaled(target, picks):
        """The criterion's ratios scaled (bisection) until the cost meets ``target``, on the widths ``picks``."""
        def at_scale(s):
            aim = ideal(s)
            return {g: min(picks[g], key=lambda w: (abs(w - aim[g]), -w)) for g in full}

        lo, hi = 0.0, s_max  # frac(at_scale(s)) falls as s grows
        for _ in range(50):
            mid = (lo + hi) / 2
            if frac(at_scale(mid)) > target:
                lo = mid
            else:
                hi = mid
        s = min((lo, hi), key=lambda v: abs(frac(at_scale(v)) - target))
        return _nudge(at_scale(s), picks, frac, target, budget.tolerance / 4, ideal(s))

    def widened(widths, target):
        """Each group at the widest grid width predicted no slower beside the rest of the plan: channels that
        cost no time are kept. The plans can leave a narrow width the table prices slower than a wider one
        (Conv-4 in int8: the first conv at 4 of 32 channels, priced slower than at 8; those plans lost 4.8 points
        to their MAC plans). A plan predicted faster stays within the share of the tolerance the measured check
        accepts at once (:data:`LATENCY_AIM`, in the units of ``target``, the corrected aim)."""
        headroom = LATENCY_AIM * budget.tolerance * target / budget.fraction
        widths, grown = dict(widths), True
        while grown:  # widths only grow: this ends
            grown = False
            for g in full:
                now = frac(widths)
                floor = min(now, target - headroom)
                wider = [w for w in choices[g] if w > widths[g] and floor <= frac({**widths, g: w}) <= now]
                if wider:
                    widths[g], grown = max(wider), True
        return widths

    def search(target):
        """Of :func:`plans` (each :func:`widened`), the one keeping the most weights within the budget's tolerance
        of ``target``, else the closest (the measured correction in ``lat.solve`` takes the rest of the miss)."""
        def rank(widths):
            near = abs(frac(widths) - target) <= budget.tolerance + 1e-12
            return (near, kept(widths) if near else -abs(frac(widths) - target))

        found = plans(lambda picks: scaled(target, picks))
        return max(found if lat is None else [widened(w, target) for w in found], key=rank)

    if lat is not None:  # measured whole on the backend, the target corrected by the miss
        widths, report = lat.solve(budget, search, choices)
        return Solution(widths, report["solves"][report["chosen"] - 1]["measured"], {"latency": report})
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


def _nudge(widths, choices, frac, target, tolerance, ideal):
    """Steps along the groups' allowed widths until the cost is within ``tolerance`` of the target.

    Single-group steps first, then paired steps (one group up, another down). Among the
    steps that land within tolerance, the one closest to the criterion's ``ideal``
    (continuous) widths wins, so rounding repairs do not undo the criterion's allocation.
    """
    widths = dict(widths)
    full = {g: max(c) for g, c in choices.items()}

    def excess(w):
        return max(abs(frac(w) - target) - tolerance, 0.0)

    def deviation(w):
        return sum(abs(w[g] - ideal[g]) / full[g] for g in w)

    def steps(g):
        options = choices[g]
        i = options.index(widths[g])
        return [options[j] for j in (i - 1, i + 1) if 0 <= j < len(options)]

    current = excess(widths)
    while current > 0:
        singles = [{g: w} for g in choices for w in steps(g)]
        best = None
        for moves in (singles, [{**a, **b} for a in singles for b in singles if a.keys() != b.keys()]):
            trials = [{**widths, **m} for m in moves]
            scored = [(excess(t), deviation(t), i) for i, t in enumerate(trials)]
            better = [sc for sc in scored if sc[0] < current]
            if better:
                best = trials[min(better)[2]]
                break
        if best is None:
            break
        widths, current = best, excess(best)
    return widths


def _measure(graph: Graph, widths: dict[str, int], dense: Cost) -> dict[str, float]:
    """Fractions by Torch-Pruning's counter on a pruned copy (which channels go does not matter)."""
    pruned = count(pruned_copy(graph.model, PruningPlan.first_channels(widths, graph), graph.example_inputs),
                   graph.example_inputs)
    return pruned.fraction_of(dense)


