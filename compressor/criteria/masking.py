"""Channel masks: prune by zeroing while a criterion still trains, then hand surgery a plan.

A masked channel has its output rows zeroed in every layer that produces it (conv/linear
weights and biases, BatchNorm scales and shifts), so its activation is exactly zero and
removing it later changes nothing (except across a LayerNorm over channels, whose statistics
count the zeroed channels: ConvNeXt). ``carriers`` says which tensors carry a group's
channels and where (a layer after a concatenation is wider than the group); every masking
criterion asks it. ``hooks`` keeps masked channels at zero while training: masked
gradients are cleared before the optimizer step (so momentum and weight decay have
nothing to act on) and the rows are zeroed again after it, as a guard.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..plan import PruningPlan, top_channels
from ..surgery import Graph, Group
from ..train import TrainHooks

_BN = nn.modules.batchnorm._BatchNorm
# layers whose weight (and bias) rows are their output channels; a transposed conv keeps them in dim 1: not here
_CARRIERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm,
             nn.GroupNorm)


@dataclass(frozen=True, eq=False)
class Carrier:
    """One tensor that carries a group's channels: ``tensor[index[c]]`` is the row of the group's channel ``c``."""

    layer: str
    module: nn.Module
    tensor: torch.Tensor
    index: torch.Tensor  # layer-local channel indices (Group.channels_in), on the tensor's device


def carriers(graph: Graph, group: Group) -> list[Carrier]:
    """The answer to "which tensors carry this group's channels, and where": the weights and biases of
    every layer that produces them (conv/linear rows, BatchNorm, LayerNorm and GroupNorm affine params).

    A layer after a concatenation is wider than the group (DenseNet's BatchNorm), so each carrier
    comes with the layer's own indices of the group's channels. A layer Torch-Pruning mapped to no
    one-to-one index is taken as the group's width when it is exactly that wide, else left out.
    """
    found = []
    for name, side in group.members:
        module = graph.module(name)
        if side != "out" or not isinstance(module, _CARRIERS):
            continue
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            continue  # a norm over (C, H, W) has no per-channel rows
        for t in (getattr(module, "weight", None), getattr(module, "bias", None)):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                continue
            index = group.channels_in(name, "out")
            if index is None:
                if t.shape[0] != group.width:
                    continue
                index = torch.arange(group.width)
            found.append(Carrier(name, module, t, index.to(t.device)))
    return found


def channel_dim(module: nn.Module) -> int:
    """The dimension of a layer's output (and input) that holds its channels.

    nn.Linear and a plain nn.LayerNorm act on the last dimension (ConvNeXt's layers after a
    Permute keep channels last); everything else, including a LayerNorm subclass with its own
    forward (torchvision's LayerNorm2d permutes inside and returns NCHW), uses dimension 1.
    """
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
        return -1
    return 1


def channel_params(graph: Graph, group: Group) -> list[torch.Tensor]:
    """The group's rows of each carrier (copies, for reading: ``t[c]`` is the group's channel ``c``).
    To write, use :func:`carriers`."""
    return [c.tensor.detach()[c.index] for c in carriers(graph, group)]


def full_masks(graph: Graph) -> dict[str, torch.Tensor]:
    return {g.name: torch.ones(g.width, dtype=torch.bool) for g in graph.groups}


@torch.no_grad()
def zero_masked(graph: Graph, masks: dict[str, torch.Tensor]) -> None:
    """Zero every masked channel's producing rows, in place."""
    for group in graph.groups:
        drop = ~masks[group.name]
        if drop.any():
            for c in carriers(graph, group):
                c.tensor[c.index[drop.to(c.index.device)]] = 0


def hooks(graph: Graph, masks: dict[str, torch.Tensor]) -> TrainHooks:
    """Training hooks that keep masked channels at exactly zero.

    Each carrier tensor gets one 0/1 multiplier over its rows (a tensor several groups write, as
    after a concatenation, gets one for all of them), and every step multiplies all gradients, then
    all weights, in one fused ``torch._foreach_mul_`` each: two launches a step on a GPU instead of
    an indexed write per tensor, which is where PSAP's and SMOEA's masked epochs lost time.
    """
    keep: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, its 0/1 row multiplier)
    for group in graph.groups:
        drop = ~masks[group.name]
        if drop.any():
            for c in carriers(graph, group):
                t = c.tensor
                if id(t) not in keep:
                    keep[id(t)] = (t, torch.ones(t.shape[0], dtype=t.dtype, device=t.device))
                keep[id(t)][1][c.index[drop.to(c.index.device)]] = 0
    tensors = [t for t, _ in keep.values()]
    multipliers = [m.reshape(-1, *([1] * (t.dim() - 1))) for t, m in keep.values()]
    on = {}  # the multipliers on each device and dtype, moved once (a model may move after this call)

    def moved(ts):
        key = tuple((t.device, t.dtype) for t in ts)
        if key not in on:
            on[key] = [m.to(t.device, t.dtype) for t, m in zip(ts, multipliers)]
        return on[key]

    def clear_grads():
        pairs = [(t.grad, m) for t, m in zip(tensors, moved(tensors)) if t.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])

    @torch.no_grad()
    def rezero():
        if tensors:
            torch._foreach_mul_(tensors, moved(tensors))

    return TrainHooks(after_backward=clear_grads, after_step=rezero)


def keep_mask(score: torch.Tensor, width: int, group: Group | None = None) -> torch.Tensor:
    """A boolean mask of the ``width`` channels :func:`compressor.plan.top_channels` keeps."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[top_channels(score, width, group)] = True
    return mask


def to_plan(masks: dict[str, torch.Tensor]) -> PruningPlan:
    return PruningPlan({g: torch.nonzero(m).flatten().tolist() for g, m in masks.items()})


def widths(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    return {g: int(m.sum()) for g, m in masks.items()}
