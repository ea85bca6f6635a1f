"""Torch-Pruning's own importances as methods, so a comparison measures the peer instead of quoting it.

Each ranks a group's channels with one of ``torch_pruning.importance``'s classes, called on
the same dependency-graph group that surgery removes (so it sees every coupled layer: the
producing conv, its BatchNorm, the next layer's input weights). The widths come from our
shared solver, like every other method here:

- ``tp-l1``, ``tp-bn``, ``tp-taylor``: every group pruned by the same ratio (Torch-Pruning's
  default, ``global_pruning=False``), keeping the channels its importance ranks highest;
- ``tp-l1-global``, ``tp-lamp``: one threshold over every group's (mean-normalised) scores
  decides the widths (``global_pruning=True``); LAMP's scores are made for that.

``tp-taylor`` needs gradients: it sums ``|w * dL/dw|`` over :data:`TAYLOR_IMAGES` training
images (gradients accumulated batch by batch, as Torch-Pruning's examples do); it does not
train, and it counts no epochs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch_pruning as tp

from ..budget import global_widths, solve_widths
from ..data import batches
from ..errors import CompressorError
from ..plan import PruningPlan
from ..surgery import Graph, autograd_on
from . import PlanRequest, register

TAYLOR_IMAGES = 2048  # training images whose loss gradients Taylor importance sums


def tp_scores(graph: Graph, importance: tp.importance.Importance) -> dict[str, torch.Tensor]:
    """Per group, Torch-Pruning's importance of each channel (channel order as the group's)."""
    dg = graph.dependency_graph
    scores = {}
    for group in graph.groups:
        pruner = dg.get_pruner_of_module(group.root)
        tp_group = dg.get_pruning_group(group.root, pruner.prune_out_channels, idxs=list(range(group.width)))
        score = importance(tp_group)
        if score is None or score.numel() != group.width:  # a group of layers the importance ignores
            raise CompressorError(f"{type(importance).__name__} gives no score to group {group.name!r}")
        scores[group.name] = score.detach().float().cpu()
    return scores


GLOBAL_PEERS = {"tp-lamp": tp.importance.LAMPImportance,
                "tp-l1-global": lambda: tp.importance.GroupMagnitudeImportance(p=1)}


def global_allocation(graph: Graph, name: str, budget, round_to: int, max_ratio: float) -> dict[str, int]:
    """The widths a global peer (``tp-lamp``, ``tp-l1-global``) spreads ``budget`` over, as priced by the
    budget's cost model (its latency model included), before the solver's final correction: how the peer
    would allocate the budget over the layers (SMOEA starts from it)."""
    if name not in GLOBAL_PEERS:
        raise CompressorError(f"{name!r} is not a global Torch-Pruning peer; choose from {', '.join(GLOBAL_PEERS)}")
    return global_widths(graph, tp_scores(graph, GLOBAL_PEERS[name]()), budget, round_to, max_ratio)


def _accumulate_gradients(request: PlanRequest) -> None:
    """Sum the loss gradients of :data:`TAYLOR_IMAGES` training images into the weights' ``.grad``."""
    if request.data is None:
        raise CompressorError("tp-taylor needs data: its importance is built from loss gradients")
    model, device = request.model, request.device
    model.zero_grad(set_to_none=True)
    was_training = model.training
    model.eval()  # BatchNorm as at inference: the statistics are not changed by scoring
    seen = 0
    with autograd_on():
        for x, y in batches(request.data, "train", 128, device, train=False):
            nn.functional.cross_entropy(model(x), y).backward()
            seen += len(y)
            if seen >= TAYLOR_IMAGES:
                break
    model.train(was_training)


def _peer(importance: Callable[[], tp.importance.Importance], use_global: bool, gradients: bool = False):
    def method(request: PlanRequest, _config=None) -> PruningPlan:
        graph = request.traced()
        if gradients:
            _accumulate_gradients(request)
        try:
            scores = tp_scores(graph, importance())
        finally:
            if gradients:
                request.model.zero_grad(set_to_none=True)
        if use_global:
            start = global_widths(graph, scores, request.budget, request.round_to, request.max_ratio)
            ratios = {g: 1.0 - start[g] / graph.group(g).width for g in start}
        else:
            ratios = None  # every group alike
        widths = solve_widths(graph, request.budget, ratios, request.round_to, request.max_ratio).widths
        request.report["peer"] = {"importance": importance().__class__.__name__, "global": use_global}
        return PruningPlan.from_scores(scores, widths, graph)

    return method


register("tp-l1")(_peer(lambda: tp.importance.GroupMagnitudeImportance(p=1), use_global=False))
register("tp-l1-global")(_peer(GLOBAL_PEERS["tp-l1-global"], use_global=True))
register("tp-bn")(_peer(tp.importance.BNScaleImportance, use_global=False))
register("tp-taylor")(_peer(tp.importance.GroupTaylorImportance, use_global=False, gradients=True))
register("tp-lamp")(_peer(GLOBAL_PEERS["tp-lamp"], use_global=True))
