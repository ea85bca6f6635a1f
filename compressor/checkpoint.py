"""Pruned-model files: a JSON architecture spec beside a plain ``state_dict``.

Like NVIDIA Model Optimizer's ``modelopt_state``, the architecture is kept apart from
the weights: the spec names the model factory and the width of every prunable group,
and loading calls that factory, cuts a fresh model to those widths through the same
surgery, then loads the weights. ``torch.load(weights_only=True)`` reads the file, so no
pickled code runs, and the file survives refactors that would break ``torch.save(model)``.

The spec is data from the file, so it is checked before it is used: every field's type and
size, and its factory through :func:`compressor.models.check_trusted` (a registered model, a
torchvision classification builder, or one the caller trusts), before anything is imported.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from . import models, surgery
from .errors import CheckpointError, CompressorError
from .files import atomic_path
from .plan import PruningPlan
from .surgery import autograd_on

FORMAT = "compressor.checkpoint/1"
MAX_INPUT_ELEMENTS = 1 << 26  # C x H x W of one image a spec may ask for (a 3 x 4096 x 4096 image fits)


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

    @classmethod
    def from_dict(cls, data, where: str) -> "ModelSpec":
        """A spec read from a file, every field checked; fields a newer writer added are ignored."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise CheckpointError(f"{where}: the recorded model spec is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: the recorded model spec is not a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            spec = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"{where}: the recorded model spec is incomplete ({exc})") from None
        return spec.checked(where)

    def checked(self, where: str) -> "ModelSpec":
        """This spec, if every field has the type and size a model spec can have; else one clear error."""
        def count(x, low=1, high=None):
            return isinstance(x, int) and not isinstance(x, bool) and x >= low and (high is None or x <= high)

        def numbers(x):
            return isinstance(x, list) and 0 < len(x) <= 64 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in x)

        problems = []
        if not isinstance(self.model, str) or not self.model:
            problems.append("model is not a name")
        if not isinstance(self.factory_kwargs, dict):
            problems.append("factory_kwargs is not an object")
        shape = self.input_shape
        if not (isinstance(shape, list) and len(shape) == 3 and all(count(d, 1, 1 << 16) for d in shape)
                and math.prod(shape) <= MAX_INPUT_ELEMENTS):
            problems.append(f"input_shape {shape!r} is not [C, H, W] of at most {MAX_INPUT_ELEMENTS} values")
        if not count(self.num_classes, 1, 1 << 20):
            problems.append(f"num_classes {self.num_classes!r} is not a positive whole number")
        if not (isinstance(self.widths, dict) and all(isinstance(k, str) and count(v, 1, 1 << 20)
                                                      for k, v in self.widths.items())):
            problems.append("widths is not an object of positive whole numbers")
        norm = self.normalization
        if not (isinstance(norm, dict) and all(v is None or numbers(v) for k, v in norm.items()
                                               if k in ("mean", "std"))):
            problems.append("normalization is not {mean: [numbers], std: [numbers]}")
        if not isinstance(self.dataset, str):
            problems.append("dataset is not text")
        if not (isinstance(self.classes, list) and all(isinstance(c, str) for c in self.classes)):
            problems.append("classes is not a list of names")
        if problems:
            raise CheckpointError(f"{where}: the recorded model spec is malformed: {'; '.join(problems)}")
        return self


def spec_for(model: nn.Module, model_name: str, factory_kwargs: dict, input_shape, num_classes: int,
             **extra) -> ModelSpec:
    """Describe ``model`` (dense or pruned) so that :func:`load` can rebuild it."""
    x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
    widths = surgery.trace(model, x).widths()
    return ModelSpec(model_name, dict(factory_kwargs), list(input_shape), int(num_classes), widths, **extra)


def save(model: nn.Module, spec: ModelSpec, path: str | os.PathLike, self_test: dict | None = None) -> Path:
    """Write ``model`` with its ``spec``; ``self_test`` (:func:`compressor.selftest.make`) rides along as JSON."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "spec": json.dumps(asdict(spec)), "state_dict": state}
    if self_test is not None:
        payload["self_test"] = json.dumps(self_test)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _payload(path: Path):
    """The file's contents, read without running pickled code."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}" + (" (it is a directory)" if path.is_dir() else ""))
    with open(path, "rb") as f:
        head = f.read(64)
    # torch.save writes a zip archive (or, before torch 1.6, a pickle stream: protocol 2+ starts with 0x80);
    # anything else is not one, whatever it is, and must not be reported as pickled objects
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        text = head.lstrip()
        what = ("an empty file" if not head else
                "a text file (JSON?)" if text[:1] in (b"{", b"[") else
                "a text file" if all(32 <= b < 127 or b in b"\r\n\t" for b in head) else "binary data")
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: it is {what}, not a file written by torch.save "
                              "(compressor.save, or torch.save(model.state_dict(), path))")
    try:
        with autograd_on():  # tensors read under inference_mode would be inference tensors
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower() and "weights_only" not in str(exc).lower():
            raise CheckpointError(f"{path} is a damaged PyTorch file ({str(exc).splitlines()[0][:200]})") from None
        raise CheckpointError(
            f"{path} holds pickled Python objects (a whole model saved with torch.save(model)?), which compressor "
            "does not unpickle because that runs arbitrary code; save the weights instead: "
            "torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file has many failure modes
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def read(path: str | os.PathLike) -> tuple[ModelSpec, dict]:
    spec, state, _ = _read(Path(path))
    return spec, state


def recorded_self_test(path: str | os.PathLike) -> dict | None:
    """The self-test a checkpoint carries (None for one saved without), as JSON data."""
    return _read(Path(path))[2]


def _read(path: Path) -> tuple[ModelSpec, dict, dict | None]:
    payload = _payload(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a compressor checkpoint (expected format {FORMAT!r})")
    if "spec" not in payload:
        raise CheckpointError(f"{path} has no architecture spec")
    spec = ModelSpec.from_dict(payload["spec"], str(path))
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path} has no state_dict of named tensors")
    record = payload.get("self_test")
    if record is not None:
        try:
            record = json.loads(record)
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: its self-test record is not JSON") from None
    return spec, state, record


def build(spec: ModelSpec, trusted_factories: Iterable[str] = ()) -> nn.Module:
    """A model with the spec's architecture and widths, with untrained weights.

    The spec's factory must pass :func:`compressor.models.check_trusted` (``trusted_factories``:
    the ``module:function`` names the caller trusts beyond the registry and torchvision).

    The spec lists the pruned model's groups. Surgery can split a dense group (a depthwise
    conv cut to one channel traces as a plain conv, the root of a new group), so widths
    of groups the dense model lacks are not cut but checked on the rebuilt model.
    """
    with autograd_on():  # works under torch.no_grad() / torch.inference_mode() too
        model = models.build_trusted(spec.model, spec.factory_kwargs, trusted_factories,
                                     where="the checkpoint's spec")
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


def load(path: str | os.PathLike, with_spec: bool = False, trusted_factories: Iterable[str] = ()):
    """Rebuild a (pruned) model from ``path``; with ``with_spec`` also return its :class:`ModelSpec`.

    A spec naming a factory outside the registry and torchvision's classification models is
    refused before any import, unless it is in ``trusted_factories`` (``"module:function"``).
    """
    model, spec, _ = load_with_self_test(path, trusted_factories)
    return (model, spec) if with_spec else model


def load_with_self_test(path: str | os.PathLike, trusted_factories: Iterable[str] = ()):
    """``(model, spec, self-test record or None)``: what the runtime loader needs from one read of the file."""
    trusted_factories = models.trusted_names(trusted_factories)
    spec, state, record = _read(Path(path))
    model = build(spec, trusted_factories)
    try:
        with autograd_on():
            model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the architecture spec: {exc}") from None
    model.eval()
    return model, spec, record


def load_for_run(path: str | os.PathLike, model_name: str, num_classes: int, in_channels: int,
                 trusted_factories: Iterable[str] = ()):
    """``(model, spec)`` from a compressor checkpoint, or ``(model, None)`` from a plain state_dict.

    A plain ``torch.save(model.state_dict(), path)`` file holds no architecture, so it is
    loaded into ``model_name`` built for the run's classes and input channels.
    """
    path = Path(path)
    payload = _payload(path)
    if isinstance(payload, dict) and "format" in payload:
        return load(path, with_spec=True, trusted_factories=trusted_factories)
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
