"""Split a model at a layer: run the prefix once, then only the suffix, with channel gates.

SMOEA scores hundreds of candidate masks for one group of layers. Everything before the
group is the same for every candidate, so its outputs are computed once per batch, and
each candidate runs only the rest of the network. Masks act as per-channel multipliers
after every layer that produces a gated channel (conv/linear and BatchNorm alike), which
zeroes exactly what surgery would remove, so no candidate needs surgery.
Built with ``torch.fx``: the model must be symbolically traceable.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import TraceError
from .surgery import PRUNABLE_TYPES, Graph

_GATED = PRUNABLE_TYPES + (nn.modules.batchnorm._BatchNorm,)


def _gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return x * gate.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))



class Split:
    """``prefix(x)`` -> cut tensors; ``suffix(*cut, *gates)`` -> logits, gates ordered as ``groups``."""

    def __init__(self, graph: Graph, groups: list[str]):
        model = graph.model
        try:
            traced = fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - any failure becomes one clear message
            raise TraceError(f"torch.fx cannot trace {type(model).__name__} to split it: {exc}") from exc
        gate_of = {}
        for name in groups:
            for layer, side in graph.group(name).members:
                if side == "out" and isinstance(graph.module(layer), _GATED):
                    gate_of[layer] = name
        nodes = list(traced.graph.nodes)
        gated = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target in gate_of]
        if not gated:
            raise TraceError(f"none of the layers of {groups} run in {type(model).__name__}'s traced graph")
        cut = min(gated)
        position = {n: i for i, n in enumerate(nodes)}
        boundary = [n for n in nodes[:cut] if any(position[u] >= cut for u in n.users)]

        prefix, env = fx.Graph(), {}
        for n in nodes[:cut]:
            env[n] = prefix.node_copy(n, lambda a: env[a])
        prefix.output(tuple(env[b] for b in boundary))

        suffix, env = fx.Graph(), {}
        for i, b in enumerate(boundary):
            env[b] = suffix.placeholder(f"cut_{i}")
        gates = {name: suffix.placeholder(f"gate_{i}") for i, name in enumerate(groups)}
        for n in nodes[cut:]:
            new = suffix.node_copy(n, lambda a: env[a])
            if n.op == "call_module" and n.target in gate_of:
                new = suffix.call_function(_gate, (new, gates[gate_of[n.target]]))
            env[n] = new
        self.groups = list(groups)
        self.prefix = fx.GraphModule(traced, prefix)
        self.suffix = fx.GraphModule(traced, suffix)

    def cut(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.prefix(x))

    def run(self, cut: tuple[torch.Tensor, ...], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.suffix(*cut, *(masks[g] for g in self.groups))
