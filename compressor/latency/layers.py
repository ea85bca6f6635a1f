"""The prunable layers as the table sees them: what each is, its input size, which groups set its
widths, and the single-layer module that is timed for it.

A layer is a conv or linear with the BatchNorm, activation and pooling layers that run right
after it on its output (they cost time in proportion to its width, and backends fuse them).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..surgery import leaf_calls

FOLLOWERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU,
             nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


@dataclass
class LayerSpec:
    """One prunable layer: what it is, its input, and which groups set its widths."""

    name: str
    kind: str  # "conv" or "linear"
    config: dict  # conv: kernel_size, stride, padding, dilation, groups, bias, padding_mode; linear: bias
    in_full: int
    out_full: int
    input_shape: list[int]  # per sample, without the channel dim (conv: [H, W]; linear: leading dims)
    in_groups: list[str]
    out_groups: list[str]
    depthwise: bool = False
    followers: list[dict] = field(default_factory=list)  # [{"type": "BatchNorm2d"}, {"type": "MaxPool2d", ...}]

    def shape_key(self) -> dict:
        """What a point's timing depends on beside its (input, output) channels: not the layer's name, its
        full widths or which groups drive it, so identical layers share their points."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "in_full", "out_full", "in_groups",
                                                                     "out_groups")}


def _follower(module: nn.Module) -> dict:
    kind = type(module).__name__
    if isinstance(module, nn.MaxPool2d):
        return {"type": kind, "kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                "dilation": module.dilation, "ceil_mode": module.ceil_mode}
    if isinstance(module, nn.AvgPool2d):
        return {"type": kind, "kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                "ceil_mode": module.ceil_mode, "count_include_pad": module.count_include_pad}
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return {"type": kind, "output_size": module.output_size}
    if isinstance(module, nn.LeakyReLU):
        return {"type": kind, "negative_slope": module.negative_slope}
    return {"type": kind}


def _make_follower(f: dict, width: int) -> nn.Module:
    kind = f["type"]
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(nn, kind)(width)
    if kind == "MaxPool2d":
        return nn.MaxPool2d(f["kernel_size"], f["stride"], f["padding"], f.get("dilation", 1),
                            ceil_mode=f.get("ceil_mode", False))
    if kind == "AvgPool2d":
        return nn.AvgPool2d(f["kernel_size"], f["stride"], f["padding"], f.get("ceil_mode", False),
                            f.get("count_include_pad", True))
    if kind == "AdaptiveAvgPool2d":
        return nn.AdaptiveAvgPool2d(f["output_size"])
    if kind == "LeakyReLU":
        return nn.LeakyReLU(f["negative_slope"])
    return getattr(nn, kind)()


def layer_specs(graph) -> list[LayerSpec]:
    """The prunable layers of a traced model, in the order they run, with their inputs' sizes and the
    groups that size them."""
    sides: dict[str, dict[str, set[str]]] = {}
    for g in graph.groups:
        for layer, side in g.members:
            sides.setdefault(layer, {"out": set(), "in": set()})[side].add(g.name)
    order = leaf_calls(graph.model, graph.example_inputs[:1])
    specs, seen = [], set()
    for i, (name, module, shape) in enumerate(order):
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or name in seen:
            continue
        seen.add(name)
        side = sides.get(name, {"out": set(), "in": set()})
        out_groups = sorted(side["out"])
        in_groups = sorted(side["in"] - side["out"])
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            config = {"kernel_size": list(module.kernel_size), "stride": list(module.stride),
                      "padding": list(module.padding) if not isinstance(module.padding, str) else module.padding,
                      "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
                      "padding_mode": module.padding_mode}
            spec = LayerSpec(name, "conv", config, module.in_channels, module.out_channels, list(shape[2:]),
                             in_groups, out_groups, depthwise)
        else:
            spec = LayerSpec(name, "linear", {"bias": module.bias is not None}, module.in_features,
                             module.out_features, list(shape[1:-1]), in_groups, out_groups)
        for _, nxt, _ in order[i + 1:]:  # what runs right after it on its channels
            if not isinstance(nxt, FOLLOWERS):
                break
            if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)) and nxt.num_features != spec.out_full:
                break
            if spec.kind == "linear" and isinstance(nxt, POOLS):
                break
            spec.followers.append(_follower(nxt))
        specs.append(spec)
    return specs


def _share(groups, widths, full) -> float:
    return sum(widths[g] for g in groups) / sum(full[g] for g in groups) if groups else 1.0


def layer_widths(spec: LayerSpec, widths: dict[str, int], full: dict[str, int]) -> tuple[float, float]:
    """(input, output) channel counts of the layer at group ``widths`` (not rounded: table coordinates)."""
    out = spec.out_full * _share(spec.out_groups, widths, full)
    cin = out if spec.depthwise else spec.in_full * _share(spec.in_groups, widths, full)
    return cin, out


def build_layer(spec: LayerSpec, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The single-layer module at (cin, cout) channels and its input shape at batch 1."""
    if spec.kind == "linear":
        layers: list[nn.Module] = [nn.Linear(cin, cout, bias=spec.config["bias"])]
        shape = (1, *spec.input_shape, cin)
    else:
        c = spec.config
        groups = c["groups"]
        if spec.depthwise:
            cin = groups = cout
        elif groups > 1:
            cin, cout = -(-cin // groups) * groups, -(-cout // groups) * groups
        padding = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
        layers = [nn.Conv2d(cin, cout, tuple(c["kernel_size"]), tuple(c["stride"]), padding, tuple(c["dilation"]),
                            groups, c["bias"], c["padding_mode"])]
        shape = (1, cin, *spec.input_shape)
    layers += [_make_follower(f, cout) for f in spec.followers]
    module = nn.Sequential(*layers).eval()
    for m in module.modules():  # BN statistics that are not the identity, as in a trained model
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module, shape
