"""FFR: feature flow regularization, then pruning by filter norm (our reading of the seed paper;
its full text was not available).

The *flow* is the sequence of feature maps x_1 .. x_L that the model's activation
modules output (ReLU, ReLU6, SiLU, GELU, Hardswish, ...: the flow is about the features,
not about one nonlinearity), in the order they run during one forward pass (a module
called twice, as in a ResNet block, gives two points). Our choices: activations inside a
squeeze-and-excitation branch are left out (pooled side vectors, not the flow); a model
with functional activations only (GoogLeNet) follows its normalisation layers' outputs,
one per conv, where the activations would be; channels-last points (ConvNeXt's GELU after
a Permute) are read channels-first. Forward hooks collect them in the training pass
itself: no second forward.

Shapes are matched by a fixed, parameter-free projection, as ResNet's option-A shortcuts
do: spatial sizes are average-pooled down to the smallest of the maps compared, and
channels are zero-padded up to the largest. Flat features (N, C) count as C x 1 x 1.
With ``rms(d) = ||d||_2 / sqrt(numel(d))`` per image (so that layers of different size
weigh alike), averaged over the batch:

    length    = sum_l rms(x_{l+1} - x_l)
    curvature = sum_l rms(x_{l+1} - 2 x_l + x_{l-1})

The loss adds ``w_len * length + w_curv * curvature``, both weights ramped linearly from 0
over ``--ffr-warmup`` epochs; the two terms are logged apart in the run's history.

Pruning: after ``--ffr-epochs`` (default 1) of regularised training (from the random
initialisation with ``--from-scratch``, or fine-tuning the dense model), each channel is scored
by ``--ffr-score``: ``group`` (default) is the L1 norm of every weight its removal takes (its
filter, its BatchNorm, the next layers' input weights: Torch-Pruning's GroupMagnitudeImportance),
``bn`` its BatchNorm scale |gamma| (mean over the group's BatchNorms), ``norm`` its filter's L2
norm (also ``bn``'s fallback in a group without BatchNorm). The paper prunes "by filter norm or
BN scale"; the group norm is our reading of the filter norm for a channel whose removal also
takes weights downstream. The widths come from one global threshold over all groups' scores,
each group's scores divided by their mean first (raw scores of different layers are not
comparable: one raw threshold over BN scales left VGG-16's first layers 8-16 channels wide, see
issue 15), and no group may go below ``--ffr-floor`` x the width uniform pruning would give it.
The shared solver then meets the budget exactly from those widths, keeping the floors. The
per-layer normalisation and the floor are our choices, not the paper's.

Why these defaults (Conv-4 / CIFAR-10, 5 epochs after the dense model, 3 seeds, paired with L1;
``benchmarks/results/README.md``): with 2 regularised epochs, ``group`` beat ``bn`` and ``norm``
at 10% and 5% of params (+0.46 / -2.05 points against -0.39 / -2.51 and -1.48 / -4.43); the
regularised epochs train the dense width, and at equal epochs each one is a fine-tuning epoch
the pruned model loses: 1 epoch gave +1.51 (better) / -0.58 (tie) where 2 gave +0.46 / -2.05.
The penalty made no channel near-zero at any weight that kept accuracy (a sweep of its weight).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from ..budget import global_widths, solve_widths
from ..errors import CompressorError
from ..plan import PruningPlan
from ..surgery import PRUNABLE_TYPES, Graph
from ..train import TrainHooks, evaluate, fit
from . import CriterionConfig, PlanRequest, option, register, train_config
from .masking import carriers, channel_dim
from .peers import tp_scores

_BN = nn.modules.batchnorm._BatchNorm
NEAR_ZERO = 1e-2  # of the layer's largest score: the measure of structured sparsity
FLOOR = 0.5  # no group ends narrower than this share of the width uniform pruning would give it


def floor_widths(graph: Graph, budget, round_to: int, max_ratio: float, floor: float) -> dict[str, int]:
    """Each group's least width: ``floor`` x the width uniform pruning (every group alike) gives it at this
    budget, so that a global threshold cannot starve a layer."""
    if floor <= 0:
        return {}
    uniform = solve_widths(graph, budget, None, round_to, max_ratio).widths
    return {g: int(math.ceil(floor * w)) for g, w in uniform.items()}


def _as_maps(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 4 else x.reshape(x.shape[0], -1, 1, 1)


def match(*features: torch.Tensor) -> list[torch.Tensor]:
    """Bring feature maps to one shape: average-pool to the smallest H and W, zero-pad to the most channels.

    (``flow_terms`` computes the same thing without materialising the padding.)
    """
    maps = [_as_maps(f) for f in features]
    h, w = min(m.shape[2] for m in maps), min(m.shape[3] for m in maps)
    c = max(m.shape[1] for m in maps)
    return [F.pad(_pool(m, h, w), (0, 0, 0, 0, 0, c - m.shape[1])) for m in maps]


def _pool(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return m if m.shape[2:] == (h, w) else F.adaptive_avg_pool2d(m, (h, w))


def _combination_rms(parts: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """rms of sum(coef * map) over zero-padded channels, block by block instead of padding; batch mean.

    Maps are split once into channel blocks (``torch.split``: its backward is one
    concatenation, where slicing would build a zero-filled gradient per slice).
    """
    bounds = sorted({m.shape[1] for _, m in parts})
    sizes = [hi - lo for lo, hi in zip([0] + bounds, bounds)]
    blocks = [(coef, torch.split(m, sizes[:bounds.index(m.shape[1]) + 1], dim=1)) for coef, m in parts]
    squares = 0
    for b in range(len(bounds)):
        block = None
        for coef, pieces in blocks:
            if b < len(pieces):
                piece = pieces[b] if coef == 1 else coef * pieces[b]
                block = piece if block is None else block + piece
        squares = squares + block.float().flatten(1).square().sum(1)
    numel = bounds[-1] * parts[0][1].shape[2] * parts[0][1].shape[3]
    return (squares / numel).clamp_min(1e-24).sqrt().mean()  # the clamp keeps the gradient finite at 0


def flow_terms(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(length, curvature) of a feature trajectory, as defined in the module docstring."""
    maps = [_as_maps(f) for f in features]
    pooled: dict[tuple[int, int, int], torch.Tensor] = {}

    def at(i, h, w):  # each map is pooled to each size once
        if (i, h, w) not in pooled:
            pooled[(i, h, w)] = _pool(maps[i], h, w)
        return pooled[(i, h, w)]

    def term(idx, coefs):
        h, w = min(maps[i].shape[2] for i in idx), min(maps[i].shape[3] for i in idx)
        return _combination_rms([(c, at(i, h, w)) for c, i in zip(coefs, idx)])

    zero = torch.zeros((), device=maps[0].device) if maps else torch.zeros(())
    length = sum((term((i, i + 1), (1, -1)) for i in range(len(maps) - 1)), zero)
    curvature = sum((term((i, i + 1, i + 2), (1, -2, 1)) for i in range(len(maps) - 2)), zero)
    return length, curvature


# activation modules whose outputs make the flow; Hardtanh covers ReLU6
ACTIVATIONS = (nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Softplus)
GATES = (nn.Sigmoid, nn.Hardsigmoid)  # squeeze-and-excitation scales: a side branch, not the flow
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_LAYOUT = (nn.modules.conv._ConvNd, nn.Linear) + _NORMS


def flow_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the flow's points (see the module docstring; our choice).

    The model's activation modules, whichever kind (ReLU, ReLU6, SiLU, GELU, Hardswish, ...),
    less those inside a squeeze-and-excitation branch (an activation whose sibling is a
    Sigmoid/Hardsigmoid gate), whose outputs are pooled side vectors rather than the features
    that flow on. A model with no activation modules (functional ones, as GoogLeNet's) follows
    its normalisation layers instead: each sits where a block's features leave a conv, one
    point per layer, as the activations would be; without those either, its conv layers.
    """
    side = set()
    for parent in model.modules():
        children = list(parent.children())
        if any(isinstance(c, GATES) for c in children):
            side.update(id(c) for c in children if isinstance(c, ACTIVATIONS))
    for kinds in (ACTIVATIONS, _NORMS, (nn.modules.conv._ConvNd,)):
        found = [m for m in model.modules() if isinstance(m, kinds) and id(m) not in side]
        if found:
            return found
    return []


class FlowRecorder:
    """Collects the flow points (``flow_modules``) of each training forward pass, as (N, C, ...) maps.

    A point computed channels-last (ConvNeXt's GELU between two nn.Linear layers after a
    Permute) is moved to channels-first: its layout is that of the last conv, linear or norm
    layer that ran before it (``masking.channel_dim``)."""

    def __init__(self, model: nn.Module):
        modules = flow_modules(model)
        if len(modules) == 0:
            raise CompressorError(f"ffr follows the feature flow through activation, norm or conv modules; "
                                  f"{type(model).__name__} has none")
        self.features: list[torch.Tensor] = []
        self.last_dim = 1
        self.handles = [model.register_forward_pre_hook(lambda *_: self.features.clear())]
        self.handles += [m.register_forward_hook(self._layout) for m in model.modules() if isinstance(m, _LAYOUT)]
        self.handles += [m.register_forward_hook(self._keep) for m in modules]

    def _layout(self, module, _inputs, output):
        if isinstance(output, torch.Tensor):
            self.last_dim = channel_dim(module) if output.dim() > 2 else 1

    def _keep(self, module, _inputs, output):
        if module.training and isinstance(output, torch.Tensor):
            self.features.append(output.movedim(-1, 1) if self.last_dim == -1 and output.dim() > 2 else output)

    def close(self):
        for h in self.handles:
            h.remove()


@functools.cache  # one compiled function per process: each new torch.compile wrapper would compile again
def _compiled_flow_terms():
    """flow_terms fused by torch.compile: in eager mode its dozens of small kernels per step cost
    more than the VGG-16 step itself on an H100 (10 s vs 3.7 s per CIFAR-10 epoch). A compiler
    failure in the first forward falls back to eager; one in the compiled backward stops the run."""
    compiled = torch.compile(flow_terms, dynamic=False)

    def terms(features):
        nonlocal compiled
        if compiled is not flow_terms:
            try:
                return compiled(features)
            except Exception as exc:  # noqa: BLE001 - a compiler failure costs speed, not the run
                print(f"ffr: torch.compile of the penalty failed ({type(exc).__name__}: {exc}); running it eagerly")
                compiled = flow_terms
        return flow_terms(features)

    return terms


def penalty(recorder: FlowRecorder, length_weight: float, curvature_weight: float, warmup: float,
            compiled: bool = False):
    """The TrainHooks penalty: weighted terms, ramped over the first ``warmup`` share of training."""
    compute = _compiled_flow_terms() if compiled else flow_terms

    def terms(progress: float) -> dict[str, torch.Tensor]:
        ramp = min(1.0, progress / warmup) if warmup > 0 else 1.0
        length, curvature = compute(recorder.features)
        recorder.features = []
        return {"ffr_length": ramp * length_weight * length, "ffr_curvature": ramp * curvature_weight * curvature}

    return terms


def compile_penalty(setting: str, model: nn.Module) -> bool:
    """``--ffr-compile``: ``on``, ``off``, or ``auto`` (compile where the model is on a GPU)."""
    return setting == "on" or (setting == "auto" and next(model.parameters()).is_cuda)


@contextlib.contextmanager
def regularised(model: nn.Module, length_weight: float, curvature_weight: float, warmup: float,
                compiled: bool = False):
    """Training hooks adding the penalty, compiled with ``torch.compile`` if ``compiled``."""
    recorder = FlowRecorder(model)
    try:
        yield TrainHooks(penalty=penalty(recorder, length_weight, curvature_weight, warmup, compiled))
    finally:
        recorder.close()


def channel_scores(graph: Graph, score: str = "bn") -> dict[str, torch.Tensor]:
    """Per group: mean |gamma| over its BatchNorms, or (``norm``, or no BatchNorm) the filters' L2 norm, or
    (``group``) the L1 magnitude of every weight the channel's removal takes: its filter, its BatchNorm and the
    next layers' input weights (Torch-Pruning's GroupMagnitudeImportance, p=1).

    Only the group's channels of each layer count (``masking.carriers``): a BatchNorm after a
    concatenation is wider than the group."""
    if score == "group":
        return tp_scores(graph, tp.importance.GroupMagnitudeImportance(p=1))
    scores = {}
    for group in graph.groups:
        weights = [c for c in carriers(graph, group) if c.tensor is c.module.weight]
        bns = [c.tensor.detach()[c.index].abs().float().cpu() for c in weights if isinstance(c.module, _BN)]
        if score == "bn" and bns:
            scores[group.name] = torch.stack(bns).mean(0)
        else:
            sq = sum(c.tensor.detach()[c.index].float().pow(2).flatten(1).sum(1).cpu() for c in weights
                     if isinstance(c.module, PRUNABLE_TYPES))
            scores[group.name] = sq.sqrt()
    return scores


def near_zero_share(scores: dict[str, torch.Tensor], relative: float = NEAR_ZERO) -> dict[str, float]:
    """Per group, and overall, the share of channels scoring below ``relative`` x the group's largest score."""
    shares = {g: float((s < relative * s.max()).float().mean()) for g, s in scores.items()}
    total = sum(s.numel() for s in scores.values())
    shares["all"] = sum(shares[g] * scores[g].numel() for g in scores) / total
    return shares


@dataclass(frozen=True)
class FFRConfig(CriterionConfig):
    """Feature flow regularization: train with a penalty on the flow's length and curvature, prune by norm."""

    length: float = option(0.01, "weight of the flow's length term", flag="--ffr-length", low=0)
    curvature: float = option(0.01, "weight of the curvature term", flag="--ffr-curvature", low=0)
    warmup: float = option(1.0, "epochs over which the penalty ramps up", flag="--ffr-warmup", low=0)
    epochs: int = option(1, "epochs of regularised training", flag="--ffr-epochs", integer=True, low=0)
    score: str = option("group", "rank channels by BN scale, filter L2 norm, or the L1 norm of the channel's whole "
                        "dependency group", flag="--ffr-score", choices=("bn", "norm", "group"))
    floor: float = option(FLOOR, "no group ends narrower than this share of the width uniform pruning would give "
                          "it (0: no floor)", flag="--ffr-floor", low=0, high=1)
    compile: str = option("auto", "torch.compile the penalty (auto: on a GPU only; on a CPU it needs a C++ "
                          "compiler)", flag="--ffr-compile", choices=("auto", "on", "off"))


@register("ffr", config=FFRConfig, from_scratch=True)
def ffr(request: PlanRequest, config: FFRConfig) -> PruningPlan:
    if request.data is None:
        raise CompressorError("the ffr criterion trains with its penalty and needs data")
    epochs, length_w, curvature_w = config.epochs, config.length, config.curvature
    warmup, score, floor = config.warmup, config.score, config.floor
    compiled = compile_penalty(config.compile, request.model)
    graph = request.traced()
    history = []
    if epochs:
        training = train_config(request, epochs, request.seed,
                                schedule=request.train.schedule if request.from_scratch else "cosine")
        with regularised(request.model, length_w, curvature_w, warmup / epochs, compiled) as hooks:
            history = fit(request.model, request.data, training, request.device, desc="ffr", hooks=hooks,
                          state=request.stage("ffr"))
    scores = channel_scores(graph, score)
    floors = floor_widths(graph, request.budget, request.round_to, request.max_ratio, floor)
    start = global_widths(graph, scores, request.budget, request.round_to, request.max_ratio, floors)
    ratios = {g: 1.0 - start[g] / graph.group(g).width for g in start}
    widths = solve_widths(graph, request.budget, ratios, request.round_to, request.max_ratio, floors).widths
    request.train_epochs = epochs
    report = {"epochs": epochs, "train_epochs": epochs, "penalty_compiled": compiled and bool(epochs),
              "length_weight": length_w, "curvature_weight": curvature_w, "warmup_epochs": warmup, "score": score,
              "history": history, "near_zero_share": near_zero_share(scores),
              "scores": {g: s.tolist() for g, s in scores.items()}, "floor": floor, "floor_widths": floors,
              "threshold_widths": start, "widths": widths}
    if epochs and len(request.data.val_y):
        report["val_accuracy"] = evaluate(request.model, request.data, "val", request.device)
    if history:
        report["seconds_per_epoch"] = sum(h["seconds"] for h in history) / len(history)
    request.report["ffr"] = report
    return PruningPlan.from_scores(scores, widths, graph)  # graph: legal sets (grouped convs)
