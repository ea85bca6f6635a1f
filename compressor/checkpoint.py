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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import models, surgery
from .errors import CheckpointError, CompressorError
from .files import atomic_path
from .plan import PruningPlan

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


def spec_for(model: nn.Module, model_name: str, factory_kwargs: dict, input_shape, num_classes: int, **extra) -> ModelSpec:
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


def read(path: str | os.PathLike) -> tuple[ModelSpec, dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt file has many failure modes
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a compressor checkpoint (expected format {FORMAT!r})")
    try:
        spec = ModelSpec(**json.loads(payload["spec"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} has a malformed architecture spec: {exc}") from None
    return spec, payload["state_dict"]


def build(spec: ModelSpec) -> nn.Module:
    """A model with the spec's architecture and widths, with untrained weights."""
    model = models.build(spec.model, **spec.factory_kwargs)
    dense = surgery.trace(model, spec.example_inputs())
    if spec.widths and spec.widths != dense.widths():
        try:
            surgery.apply(model, PruningPlan.first_channels(spec.widths), spec.example_inputs(), graph=dense)
        except CompressorError as exc:
            raise CheckpointError(f"the spec's widths do not fit model {spec.model!r}: {exc}") from None
    return model


def load(path: str | os.PathLike, with_spec: bool = False):
    """Rebuild a (pruned) model from ``path``; with ``with_spec`` also return its :class:`ModelSpec`."""
    spec, state = read(path)
    model = build(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the architecture spec: {exc}") from None
    model.eval()
    return (model, spec) if with_spec else model
