"""Channel surgery through Torch-Pruning's dependency graph, and MAC/parameter counting.

This is the only module that removes channels. Coupled layers (residual adds,
concatenations, BatchNorm, depthwise convs) are Torch-Pruning's job: a *group* is the
set of layers whose channels must be removed together, and a plan names each group by
its first conv/linear layer (in ``named_modules`` order), so names survive a rebuild.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import CompressorError, TraceError
from .plan import PruningPlan

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


@dataclass
class Group:
    """Channels that live or die together. ``members`` lists (layer name, 'out' | 'in').

    ``index[(layer, side)]`` says where the group's channels sit in that layer: entry ``c``
    is the layer's own channel index of the group's channel ``c``. A layer after a
    concatenation (DenseNet's BatchNorm) is wider than the group, and the group's channels
    are a slice of it; a layer whose map Torch-Pruning did not give one-to-one is absent.
    """

    name: str
    width: int
    root: nn.Module
    members: list[tuple[str, str]] = field(default_factory=list)
    index: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    # Grouped-conv constraints (see _constrain): "free", "units" (drop whole units only),
    # "blocks" (keep as many in each block) or "fixed" (no channel may go).
    mode: str = "free"
    units: list[list[int]] = field(default_factory=list)
    fixed: list[int] = field(default_factory=list)
    blocks: list[list[int]] = field(default_factory=list)
    partitions: list[list[list[int]]] = field(default_factory=list)
    forbidden: set[int] = field(default_factory=set)  # widths that would turn a grouped conv "depthwise"
    reason: str = ""

    @property
    def out_layers(self) -> list[str]:
        return [name for name, side in self.members if side == "out"]

    def channels_in(self, layer: str, side: str = "out") -> torch.Tensor | None:
        """The layer's channel indices of this group's channels 0..width-1, or None if not mapped."""
        return self.index.get((layer, side))

    def legal_widths(self) -> list[int]:
        """Every width a legal keep set of this group can have, ascending."""
        return [w for w in self._widths() if w not in self.forbidden or w == self.width]

    def _widths(self) -> list[int]:
        if self.mode == "free":
            return list(range(1, self.width + 1))
        if self.mode == "fixed":
            return [self.width]
        if self.mode == "blocks":
            size, least = len(self.blocks[0]), self._least_per_block()
            return [len(self.blocks) * k for k in range(max(1, least), size + 1)]
        reach = 1  # bitset of subset sums of unit sizes
        for unit in self.units:
            reach |= reach << len(unit)
        return [len(self.fixed) + n for n in range(self.width + 1) if reach >> n & 1 and len(self.fixed) + n >= 1]

    def _least_per_block(self) -> int:
        fixed = set(self.fixed)
        return max(sum(c in fixed for c in block) for block in self.blocks)

    def check(self, keep: Iterable[int]) -> str | None:
        """Why ``keep`` would give a wrong model (grouped convs), or None when it is legal."""
        keep = set(keep)
        if len(keep) in self.forbidden and len(keep) != self.width:
            return (f"{self.name!r} cannot keep {len(keep)} channels: a grouped conv with as many outputs as groups "
                    f"would be taken for a depthwise one ({self.reason})")
        if self.mode == "fixed" and len(keep) != self.width:
            return f"no channel of {self.name!r} can be removed ({self.reason})"
        lost = [c for c in self.fixed if c not in keep]
        if lost:
            return f"{self.name!r} must keep channels {lost[:8]} ({self.reason})"
        for unit in self.units:
            kept = sum(c in keep for c in unit)
            if 0 < kept < len(unit):
                return (f"{self.name!r} must keep or drop channels {unit[:8]} together: they sit at the same "
                        f"position of every group of a grouped conv ({self.reason})")
        for blocks in self.partitions:
            counts = [sum(c in keep for c in block) for block in blocks]
            if len(set(counts)) > 1:
                return (f"{self.name!r} must keep as many channels in each of a grouped conv's {len(blocks)} "
                        f"groups; this plan keeps {counts} ({self.reason})")
        return None

    def choose(self, scores: torch.Tensor, width: int) -> list[int]:
        """The best legal ``width`` channels (highest total score), as a sorted list of indices.

        Grouped convs restrict which sets are legal (see :func:`_constrain`), so every
        criterion turns scores into channels here.
        """
        scores = scores.detach().float().cpu()
        if width not in self.legal_widths():
            legal = self.legal_widths()
            raise CompressorError(f"group {self.name!r} cannot keep {width} of {self.width} channels; "
                                  f"legal widths: {legal[:12]}{' ...' if len(legal) > 12 else ''} ({self.reason})")
        if self.mode == "free":
            top = torch.topk(scores, k=width, sorted=False).indices
            return sorted(top.tolist())
        if self.mode == "fixed":
            return list(range(self.width))
        keep = set(self.fixed)
        if self.mode == "blocks":
            per = width // len(self.blocks)
            for block in self.blocks:
                have = [c for c in block if c in keep]
                rest = sorted((c for c in block if c not in keep), key=lambda c: -float(scores[c]))
                keep.update(rest[: per - len(have)])
            return sorted(keep)
        for unit in _best_units(self.units, scores, width - len(self.fixed)):
            keep.update(unit)
        return sorted(keep)


@dataclass
class Graph:
    """A traced model: its dependency graph and prunable groups, in model order."""

    model: nn.Module
    example_inputs: torch.Tensor
    dependency_graph: tp.DependencyGraph
    groups: list[Group]

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise CompressorError(f"no prunable group named {name!r}; groups: {', '.join(self.names())}")

    def names(self) -> list[str]:
        return [g.name for g in self.groups]

    def widths(self) -> dict[str, int]:
        return {g.name: g.width for g in self.groups}

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)


@contextlib.contextmanager
def _tracking_modules(model: nn.Module, record: dict):
    """Record the innermost module running (to name it when tracing fails), each leaf's output, and each
    leaf's call (name, module, first input's shape) in order."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []
    record.setdefault("outputs", [])
    record.setdefault("calls", [])
    record["stack"] = stack  # the modules running now, innermost last

    def pre(module, _inputs):
        stack.append(names.get(module, "?"))
        record["failed_in"] = stack[-1]

    def post(module, _inputs, output):
        if stack:
            stack.pop()
        if not list(module.children()):
            record["outputs"].append((names.get(module, "?"), output))
            if _inputs and isinstance(_inputs[0], torch.Tensor):
                record["calls"].append((names.get(module, "?"), module, tuple(_inputs[0].shape)))

    handles = []
    for m in model.modules():
        if m is not model:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _output_layers(model: nn.Module, example_inputs: torch.Tensor) -> list[nn.Module]:
    """Layers whose channels are the model's outputs (the classifier): pruning them changes the API."""
    record: dict = {}
    with torch.no_grad(), _tracking_modules(model, record):
        output = model(example_inputs)
    outs = output if isinstance(output, (tuple, list)) else (output,)
    hits = [name for name, o in record["outputs"] if any(o is t for t in outs)]
    if not hits:  # output passed through a functional op: take the last conv/linear that ran
        hits = [name for name, _ in record["outputs"] if isinstance(model.get_submodule(name), PRUNABLE_TYPES)][-1:]
    return [model.get_submodule(name) for name in hits]


def leaf_calls(model: nn.Module, example_inputs: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Each leaf module in the order it runs on ``example_inputs`` (eval mode, no gradients): its name,
    the module and its input's shape. The same hooks as tracing: the latency table reads its layers here."""
    record: dict = {}
    with _eval_mode(model), torch.no_grad(), _tracking_modules(model, record):
        model(example_inputs)
    return record["calls"]


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Tracing runs forward passes; in eval mode they leave BatchNorm statistics alone."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def autograd_on():
    """Torch-Pruning traces through autograd, and pruned weights must be ordinary tensors.

    Inference services load models under ``torch.no_grad()`` or ``torch.inference_mode()``;
    inside this context tracing, surgery and building work the same as outside.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def trace(model: nn.Module, example_inputs: torch.Tensor, ignored_layers: Iterable[nn.Module] = ()) -> Graph:
    """Build the dependency graph and list the prunable groups (the output layer is never pruned)."""
    record: dict = {}
    if any(p.is_inference() for p in model.parameters()):
        raise TraceError(f"{type(model).__name__} was created under torch.inference_mode(), so autograd (which "
                         "Torch-Pruning traces through) cannot use its weights; build it outside inference mode")
    with _eval_mode(model), autograd_on():
        if example_inputs.is_inference():
            example_inputs = example_inputs.clone()  # outside inference mode: an ordinary tensor
        try:
            with _tracking_modules(model, record):
                ignored = list(ignored_layers) + _output_layers(model, example_inputs)
                record["failed_in"] = None
                dg = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
        except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear message
            shuffle = _channel_shuffle(model, example_inputs)
            if shuffle is not None:
                raise TraceError(
                    f"Torch-Pruning cannot trace {type(model).__name__}: it shuffles channels{shuffle} (a reshape of "
                    "the channel dimension into groups followed by a transpose), which its dependency graph cannot "
                    "follow, so channels cannot be coupled safely; ShuffleNet-style models cannot be pruned here"
                ) from exc
            where = record.get("failed_in")
            layer = f" in layer {where!r}" if where else ""
            raise TraceError(
                f"Torch-Pruning cannot trace {type(model).__name__}{layer}: {type(exc).__name__}: {exc}"
            ) from exc
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    groups = []
    for tp_group in dg.get_all_groups(ignored_layers=ignored, root_module_types=PRUNABLE_TYPES):
        width = len(tp_group[0].idxs)
        members, index = [], {}
        for item in tp_group:
            module = item.dep.target.module
            if module in names:
                side = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
                key = (names[module], side)
                if key not in index:
                    members.append(key)
                    index[key] = _layer_index(item, width)
        outs = [n for n, side in members if side == "out" and isinstance(model.get_submodule(n), PRUNABLE_TYPES)]
        root = tp_group[0].dep.target.module
        mapped = {k: v for k, v in index.items() if v is not None}
        groups.append(Group(min(outs, key=order.__getitem__), width, root, members, mapped))
        _constrain(model, groups[-1])
    groups.sort(key=lambda g: order[g.name])
    return Graph(model, example_inputs, dg, groups)


def _channel_shuffle(model: nn.Module, example_inputs: torch.Tensor) -> str | None:
    """' in <module>' where the model first splits NCHW channels into groups and transposes them, else None."""
    from torch.overrides import TorchFunctionMode

    record: dict = {}
    split: set[int] = set()  # ids of 5-D views made by splitting a 4-D tensor's channels
    found: list[str] = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = getattr(func, "__name__", "")
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if src is not None and isinstance(out, torch.Tensor):
                if name in ("view", "reshape") and src.dim() == 4 and out.dim() == 5 and out.shape[0] == src.shape[0] \
                        and out.shape[1] * out.shape[2] == src.shape[1] and min(out.shape[1], out.shape[2]) > 1:
                    split.add(id(out))
                elif name in ("transpose", "permute", "swapaxes") and id(src) in split and not found:
                    found.append(record["stack"][-1] if record.get("stack") else "")
            return out

    try:
        with torch.no_grad(), _tracking_modules(model, record), Watch():
            model(example_inputs)
    except Exception:  # noqa: BLE001 - only a diagnosis: the trace error is reported anyway
        return None
    if not found:
        return None
    return f" in {found[0]!r}" if found[0] else ""


def _best_units(units: list[list[int]], scores: torch.Tensor, size: int) -> list[list[int]]:
    """Units of total ``size`` channels with the highest summed score (units come in few sizes)."""
    by_size: dict[int, list[list[int]]] = {}
    for unit in units:
        by_size.setdefault(len(unit), []).append(unit)
    classes = [sorted(us, key=lambda u: -float(scores[u].sum())) for _, us in sorted(by_size.items())]
    sizes = [len(c[0]) for c in classes]
    gains = [[0.0] + torch.tensor([float(scores[u].sum()) for u in c]).cumsum(0).tolist() for c in classes]
    best: tuple[float, list[int]] | None = None

    def walk(i, left, counts, total):
        nonlocal best
        if i == len(classes):
            if left == 0 and (best is None or total > best[0]):
                best = (total, list(counts))
            return
        for n in range(min(len(classes[i]), left // sizes[i]), -1, -1):
            walk(i + 1, left - n * sizes[i], counts + [n], total + gains[i][n])

    walk(0, size, [], 0.0)
    if best is None:
        raise CompressorError(f"no set of channel units adds up to {size} channels")
    return [u for c, n in zip(classes, best[1]) for u in c[:n]]


def _constrain(model: nn.Module, group: Group) -> None:
    """Derive which keep sets of ``group`` keep the model correct, from its grouped convs.

    Torch-Pruning removes a grouped conv's input channels by keeping the first positions
    of one group (``keep[:len(keep) // groups]``), which is right only when the same
    local positions go in every group: those channels form a *unit*, kept or dropped
    together (a position not wholly in this group is fixed). Removing a grouped conv's
    output channels needs an equal count kept in each of its groups (*blocks*).
    Depthwise convs (groups == in == out) are coupled by Torch-Pruning and need nothing.
    """
    width = group.width
    parent = list(range(width))

    def find(c):
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    fixed: set[int] = set()
    reasons = []
    for layer, side in group.members:
        m = model.get_submodule(layer)
        if not isinstance(m, nn.modules.conv._ConvNd) or m.groups == 1:
            continue
        if m.groups == m.in_channels == m.out_channels:
            continue
        reasons.append(f"{layer} has groups={m.groups}")
        idx = group.index.get((layer, side))
        if idx is None or m.transposed or m.groups == m.out_channels:  # a map or a pruner we cannot vouch for
            group.mode, group.reason = "fixed", "; ".join(reasons)
            return
        if side == "in":
            per = m.in_channels // m.groups
            where = {int(channel): c for c, channel in enumerate(idx.tolist())}
            for p in range(per):
                present = [where[b * per + p] for b in range(m.groups) if b * per + p in where]
                if len(present) < m.groups:
                    fixed.update(present)
                for c in present[1:]:
                    parent[find(c)] = find(present[0])
        else:
            per = m.out_channels // m.groups
            blocks: list[list[int]] = [[] for _ in range(m.groups)]
            for c, channel in enumerate(idx.tolist()):
                blocks[int(channel) // per].append(c)
            if any(len(b) != per for b in blocks):
                group.mode, group.reason = "fixed", "; ".join(reasons)
                return
            group.partitions.append(blocks)
            group.forbidden.add(m.groups)  # Torch-Pruning treats groups == out_channels as depthwise
    if not reasons:
        return
    group.reason = "; ".join(reasons)
    comps: dict[int, list[int]] = {}
    for c in range(width):
        comps.setdefault(find(c), []).append(c)
    fixed_roots = {find(c) for c in fixed}
    group.fixed = sorted(c for r in fixed_roots for c in comps[r])
    group.units = [u for r, u in comps.items() if r not in fixed_roots]
    distinct = {tuple(map(tuple, p)) for p in group.partitions}

    def balanced(unit):
        return all(len({sum(c in s for c in unit) for s in map(set, p)}) == 1 for p in group.partitions)

    if all(balanced(u) for u in group.units):
        group.mode = "units" if group.units else "fixed"
    elif all(len(u) == 1 for u in group.units) and len(distinct) == 1:
        group.mode, group.blocks, group.units = "blocks", group.partitions[0], []
    else:
        group.mode, group.units = "fixed", []


def _layer_index(item, width: int) -> torch.Tensor | None:
    """Layer channel index of each group channel, from a Torch-Pruning group item's (idxs, root_idxs)."""
    idxs, roots = list(item.idxs), list(getattr(item, "root_idxs", None) or item.idxs)
    if len(idxs) != width or len(roots) != width or sorted(roots) != list(range(width)):
        return None
    index = torch.empty(width, dtype=torch.long)
    index[torch.tensor(roots, dtype=torch.long)] = torch.tensor([int(i) for i in idxs], dtype=torch.long)
    return index


def is_channels_last(model: nn.Module) -> bool:
    """True when the model's spatial conv weights are stored channels_last (as on a GPU for speed)."""
    for m in model.modules():
        # a 1x1 kernel or a single input plane is both layouts at once: look for a telling weight
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.weight.shape[1] > 1:
            w = m.weight
            return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return False


def apply(model: nn.Module, plan: PruningPlan, example_inputs: torch.Tensor, graph: Graph | None = None) -> nn.Module:
    """Remove every channel the plan does not keep, in place, and restore the memory format.

    Torch-Pruning rebuilds pruned weights with index_select, which returns contiguous
    tensors: a channels_last model came back half NCHW, and a pruned VGG-16 ran 2.5x
    slower than the dense one on an H100. So the format is put back here.
    """
    with autograd_on():
        return _apply(model, plan, example_inputs, graph)


def _apply(model: nn.Module, plan: PruningPlan, example_inputs: torch.Tensor, graph: Graph | None) -> nn.Module:
    channels_last = is_channels_last(model)
    graph = graph or trace(model, example_inputs)
    unknown = set(plan.keep) - set(graph.names())
    if unknown:
        raise CompressorError(
            f"plan names groups the model does not have: {', '.join(sorted(unknown))}; "
            f"its groups are: {', '.join(graph.names())}"
        )
    for group in graph.groups:  # every check before the first cut: a refused plan leaves the model whole
        if group.name not in plan.keep:
            continue
        keep = plan.keep[group.name]
        if not keep or len(set(keep)) != len(keep) or min(keep) < 0 or max(keep) >= group.width:
            raise CompressorError(
                f"plan for {group.name!r} must keep 1..{group.width} distinct channels in [0, {group.width}); "
                f"got {len(keep)}"
            )
        problem = group.check(keep)
        if problem:
            raise CompressorError(f"illegal plan: {problem}")
    for group in graph.groups:
        if group.name not in plan.keep:
            continue
        drop = sorted(set(range(group.width)) - set(plan.keep[group.name]))
        if drop:
            dg = graph.dependency_graph
            pruner = dg.get_pruner_of_module(group.root)
            dg.get_pruning_group(group.root, pruner.prune_out_channels, drop).prune()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def pruned_copy(model: nn.Module, plan: PruningPlan, example_inputs: torch.Tensor) -> nn.Module:
    return apply(copy.deepcopy(model), plan, example_inputs)


def write_back(model: nn.Module, trained: nn.Module, plan: PruningPlan, example_inputs: torch.Tensor) -> None:
    """Put ``trained`` (a pruned copy of ``model`` by ``plan``, trained since) into the kept positions of
    ``model``, so that ``apply(model, plan)`` gives ``trained``: a criterion that trains a physically pruned
    copy on its way hands its training on instead of throwing it away.

    Where each kept element came from is found by pruning a copy whose every value is its own flat index:
    the dependency graph decides that, so residual adds, concatenations and grouped layers need no rules here."""
    with autograd_on():
        ids = copy.deepcopy(model).to(torch.float64)
        with torch.no_grad():
            for t in ids.state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.arange(t.numel(), dtype=torch.float64).view_as(t))
        _apply(ids, plan, example_inputs.to(torch.float64), None)
    where, target, source = ids.state_dict(), model.state_dict(), trained.state_dict()
    with torch.no_grad():
        for name, value in source.items():
            if where[name].shape != value.shape:
                raise CompressorError(f"{name}: the trained copy has shape {tuple(value.shape)}, the plan gives "
                                      f"{tuple(where[name].shape)}; it is not this model pruned by this plan")
            if value.is_floating_point():
                flat = target[name].reshape(-1).clone()  # logical order, whatever the memory format
                flat[where[name].reshape(-1).long().to(flat.device)] = value.reshape(-1).to(flat.device, flat.dtype)
                target[name].copy_(flat.view(target[name].shape))
            else:  # counters (BatchNorm's num_batches_tracked)
                target[name].copy_(value)


@dataclass(frozen=True)
class Cost:
    macs: float
    params: int

    def fraction_of(self, dense: "Cost") -> dict[str, float]:
        return {"macs": self.macs / dense.macs, "params": self.params / dense.params}


def count(model: nn.Module, example_inputs: torch.Tensor) -> Cost:
    """MACs per image and parameters, by Torch-Pruning's counter (a batch of one)."""
    with _eval_mode(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs[:1])
    return Cost(float(macs), int(params))
