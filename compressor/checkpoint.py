"""Pruned-model files: a JSON architecture spec beside a plain ``state_dict``.

Like NVIDIA Model Optimizer's ``modelopt_state``, the architecture is kept apart from
the weights: the spec names the model factory and the width of every prunable group,
and loading calls that factory, cuts a fresh model to those widths through the same
surgery, then loads the weights. ``torch.load(weights_only=True)`` reads the file, so no
pickled code runs, and the file survives refactors that would break ``torch.save(model)``.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import models, surgery
from .errors import CheckpointError, CompressorError
from .files import atomic_path
from .plan import PruningPlan
from .surgery import autograd_on

FORMAT = "compressor.checkpoint/1"


@dataclass
class ModelSpec:
    model: str  # registry name or "module.path:factory"
    factory_kwargs: dict
    input_shape: list[int]  # [C, H, W]
    num_classes: int
    widths: dict[str, int] = field(default_factory=dict)  # per prunable group; empty = dense
    normalization: dict = field(default_factory=dict)  # {"mean": [...], "std": [...]}
    dataset: str = ""
    classes: list[str] = field(default_factory=list)

    def example_inputs(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, *self.input_shape)


def spec_for(model: nn.Module, model_name: str, factory_kwargs: dict, input_shape, num_classes: int,
             **extra) -> ModelSpec:
    """Describe ``model`` (dense or pruned) so that :func:`load` can rebuild it."""
    x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    widths = surgery.trace(model, x).widths()
    return ModelSpec(model_name, dict(factory_kwargs), list(input_shape), int(num_classes), widths, **extra)


def save(model: nn.Module, spec: ModelSpec, path: str | os.PathLike) -> Path:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "spec": json.dumps(asdict(spec)), "state_dict": state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _payload(path: Path):
    """The file's contents, read without running pickled code."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with autograd_on():  # tensors read under inference_mode would be inference tensors
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds pickled Python objects (a whole model saved with torch.save(model)?), which compressor "
            "does not unpickle because that runs arbitrary code; save the weights instead: "
            "torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file has many failure modes
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def read(path: str | os.PathLike) -> tuple[ModelSpec, dict]:
    path = Path(path)
    payload = _payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a compressor checkpoint (expected format {FORMAT!r})")
    try:
        spec = ModelSpec(**json.loads(payload["spec"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} has a malformed architecture spec: {exc}") from None
    return spec, payload["state_dict"]


def build(spec: ModelSpec) -> nn.Module:
    """A model with the spec's architecture and widths, with untrained weights.

    The spec lists the pruned model's groups. Surgery can split a dense group (a depthwise
    conv cut to one channel traces as a plain conv, the root of a new group), so widths
    of groups the dense model lacks are not cut but checked on the rebuilt model.
    """
    with autograd_on():  # works under torch.no_grad() / torch.inference_mode() too
        model = models.build(spec.model, **spec.factory_kwargs)
        x = spec.example_inputs()
        dense = surgery.trace(model, x)
        if spec.widths and spec.widths != dense.widths():
            names = set(dense.names())
            widths = {n: w for n, w in spec.widths.items() if n in names}
            try:
                surgery.apply(model, PruningPlan.first_channels(widths, dense), x, graph=dense)
            except CompressorError as exc:
                raise CheckpointError(f"the spec's widths do not fit model {spec.model!r}: {exc}") from None
            extra = sorted(set(spec.widths) - names)
            if extra:
                got = surgery.trace(model, x).widths()
                wrong = [n for n in extra if got.get(n) != spec.widths[n]]
                if wrong:
                    raise CheckpointError(f"the spec's widths do not fit model {spec.model!r}: plan names groups "
                                          f"the model does not have: {', '.join(wrong)}")
    return model


def load(path: str | os.PathLike, with_spec: bool = False):
    """Rebuild a (pruned) model from ``path``; with ``with_spec`` also return its :class:`ModelSpec`."""
    spec, state = read(path)
    model = build(spec)
    try:
        with autograd_on():
            model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the architecture spec: {exc}") from None
    model.eval()
    return (model, spec) if with_spec else model


def load_for_run(path: str | os.PathLike, model_name: str, num_classes: int, in_channels: int):
    """``(model, spec)`` from a compressor checkpoint, or ``(model, None)`` from a plain state_dict.

    A plain ``torch.save(model.state_dict(), path)`` file holds no architecture, so it is
    loaded into ``model_name`` built for the run's classes and input channels.
    """
    path = Path(path)
    payload = _payload(path)
    if isinstance(payload, dict) and "format" in payload:
        return load(path, with_spec=True)
    return load_state_dict_into(path, payload, model_name, num_classes, in_channels), None


def load_state_dict_into(path, state, model_name: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build ``model_name`` and load the plain state_dict ``state`` (read from ``path``) into it, strictly."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training script's {"state_dict": ..., "epoch": ...}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is neither a compressor checkpoint nor a state_dict of tensors "
                              "(save one with torch.save(model.state_dict(), path))")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel/DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    with autograd_on():
        model = models.build(model_name, **models.factory_kwargs(model_name, num_classes, in_channels))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys "
                        f"({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches, file vs model ({'; '.join(shapes[:3])}"
                        f"{'; ...' if len(shapes) > 3 else ''})")
    if problems:
        raise CheckpointError(f"{path} is a plain state_dict that does not fit --model {model_name} with "
                              f"{num_classes} classes and {in_channels} input channels: {'; '.join(problems)}")
    with autograd_on():
        model.load_state_dict(state, strict=True)
    return model
