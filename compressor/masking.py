"""Channel masks: prune by zeroing while a criterion still trains, then hand surgery a plan.

A masked channel has its output rows zeroed in every layer that produces it (conv/linear
weights and biases, BatchNorm scales and shifts), so its activation is exactly zero and
removing it later changes nothing. ``hooks`` keeps it at zero while training: masked
gradients are cleared before the optimizer step (so momentum and weight decay have
nothing to act on) and the rows are zeroed again after it, as a guard.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .plan import PruningPlan
from .surgery import PRUNABLE_TYPES, Graph, Group
from .train import TrainHooks

_BN = nn.modules.batchnorm._BatchNorm


def channel_params(graph: Graph, group: Group) -> list[torch.Tensor]:
    """Parameters whose first dimension indexes ``group``'s channels (the layers producing them)."""
    params = []
    for name, side in group.members:
        module = graph.module(name)
        if side == "out" and isinstance(module, PRUNABLE_TYPES + (_BN,)):
            params += [t for t in (module.weight, module.bias) if t is not None]
    return params


def full_masks(graph: Graph) -> dict[str, torch.Tensor]:
    return {g.name: torch.ones(g.width, dtype=torch.bool) for g in graph.groups}


@torch.no_grad()
def zero_masked(graph: Graph, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked channel's producing rows, in place."""
    for group in graph.groups:
        drop = ~masks[group.name]
        if drop.any():
            for t in channel_params(graph, group):
                t[drop.to(t.device)] = 0


def hooks(graph: Graph, masks: dict[str, torch.Tensor]) -> TrainHooks:
    """Training hooks that keep masked channels at exactly zero."""
    pairs = []
    for group in graph.groups:
        drop = ~masks[group.name]
        if drop.any():
            pairs += [(t, drop.to(t.device)) for t in channel_params(graph, group)]

    def clear_grads():
        for t, drop in pairs:
            if t.grad is not None:
                t.grad[drop] = 0

    @torch.no_grad()
    def rezero():
        for t, drop in pairs:
            t[drop] = 0

    return TrainHooks(after_backward=clear_grads, after_step=rezero)


def to_plan(masks: dict[str, torch.Tensor]) -> PruningPlan:
    return PruningPlan({g: torch.nonzero(m).flatten().tolist() for g, m in masks.items()})


def widths(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    return {g: int(m.sum()) for g, m in masks.items()}
