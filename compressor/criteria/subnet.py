"""Split a model at a layer: run the prefix once, then only the suffix, with channel gates.

SMOEA scores hundreds of candidate masks for one group of layers. Everything before the
group is the same for every candidate, so its outputs are computed once per batch, and
each candidate runs only the rest of the network. Masks act as per-channel multipliers
after every layer that carries a gated channel (``masking.carriers``: conv/linear and norm
layers alike), which zeroes exactly what surgery would remove, so no candidate needs surgery.
A layer after a concatenation is wider than a group: its gate has the layer's width, ones
outside the group's channels; channels-last layers (nn.Linear after a Permute) are gated
along their last dimension (``masking.channel_dim``).
Built with ``torch.fx``: the model must be symbolically traceable.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import TraceError
from ..surgery import Graph
from .masking import carriers, channel_dim


def _gate(x: torch.Tensor, gate: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * gate.to(x.dtype).view(shape)


class Split:
    """``prefix(x)`` -> cut tensors; ``suffix(*cut, *gates)`` -> logits, one gate per gated layer.

    ``run`` builds the layer gates from the groups' masks."""

    def __init__(self, graph: Graph, groups: list[str]):
        model = graph.model
        try:
            traced = fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - any failure becomes one clear message
            raise TraceError(f"torch.fx cannot trace {type(model).__name__} to split it: {exc}") from exc
        gate_of: dict[str, list[tuple[str, torch.Tensor]]] = {}  # layer -> (group, layer indices of its channels)
        width, dims = {}, {}
        for name in groups:
            for c in carriers(graph, graph.group(name)):
                pairs = gate_of.setdefault(c.layer, [])
                if all(g != name for g, _ in pairs):  # weight and bias share one index
                    pairs.append((name, c.index.cpu()))
                width[c.layer], dims[c.layer] = c.tensor.shape[0], channel_dim(c.module)
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
        layers = [n.target for n in nodes[cut:] if n.op == "call_module" and n.target in gate_of]
        layers = list(dict.fromkeys(layers))  # a layer called twice takes one gate
        gates = {layer: suffix.placeholder(f"gate_{i}") for i, layer in enumerate(layers)}
        for n in nodes[cut:]:
            new = suffix.node_copy(n, lambda a: env[a])
            if n.op == "call_module" and n.target in gate_of:
                new = suffix.call_function(_gate, (new, gates[n.target], dims[n.target]))
            env[n] = new
        self.groups = list(groups)
        self.layers = [(layer, width[layer], gate_of[layer]) for layer in layers]
        self._index: dict = {}  # (layer, group, device) -> index, moved to a device once
        self._whole = {layer for layer, w, pairs in self.layers
                       if len(pairs) == 1 and torch.equal(pairs[0][1], torch.arange(w))}
        self.prefix = fx.GraphModule(traced, prefix)
        self.suffix = fx.GraphModule(traced, suffix)

    def cut(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.prefix(x))

    def gates(self, masks: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One gate per gated layer, of the layer's width: the groups' masks at their channels, ones elsewhere."""
        out = []
        for layer, width, pairs in self.layers:
            if layer in self._whole:  # the common case: the layer is exactly the group's channels
                out.append(masks[pairs[0][0]])
                continue
            first = masks[pairs[0][0]]
            gate = torch.ones(width, dtype=first.dtype if first.is_floating_point() else torch.float32,
                              device=first.device)
            for group, index in pairs:
                key = (layer, group, first.device)
                if key not in self._index:
                    self._index[key] = index.to(first.device)
                gate[self._index[key]] = masks[group].to(gate.dtype)
            out.append(gate)
        return out

    def run(self, cut: tuple[torch.Tensor, ...], masks: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.suffix(*cut, *self.gates(masks))
