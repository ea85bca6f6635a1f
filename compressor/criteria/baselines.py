"""Baselines for honest comparison: filter L1 norm (Li et al., 2017) and random.

Both prune every group by the same ratio (the scale is searched to meet the budget);
they differ only in which channels stay.
"""
from __future__ import annotations

import torch

from ..budget import solve_widths
from ..plan import PruningPlan
from ..surgery import PRUNABLE_TYPES, Graph
from . import PlanRequest, register
from .masking import carriers


def filter_l1(graph: Graph, groups=None) -> dict[str, torch.Tensor]:
    """Per group, the L1 norm of each output filter, summed over the group's coupled conv/linear layers."""
    scores = {}
    for group in graph.groups if groups is None else groups:
        total = torch.zeros(group.width)
        for c in carriers(graph, group):  # the group's rows only, where a layer is wider than the group
            if isinstance(c.module, PRUNABLE_TYPES) and c.tensor is c.module.weight:
                total += c.tensor.detach()[c.index].abs().flatten(1).sum(1).float().cpu()
        scores[group.name] = total
    return scores


@register("l1")
def l1(request: PlanRequest, _config=None) -> PruningPlan:
    graph = request.traced()
    widths = solve_widths(graph, request.budget, None, request.round_to, request.max_ratio).widths
    return PruningPlan.from_scores(filter_l1(graph), widths, graph)  # graph: legal sets (grouped convs)


@register("random")
def random(request: PlanRequest, _config=None) -> PruningPlan:
    graph = request.traced()
    widths = solve_widths(graph, request.budget, None, request.round_to, request.max_ratio).widths
    g = torch.Generator().manual_seed(request.seed)
    scores = {n: torch.rand(w, generator=g) for n, w in graph.widths().items()}
    return PruningPlan.from_scores(scores, widths, graph)
