"""Model registry, in the manner of timm's ``create_model``.

A model is named either by a registry name (``vgg16``) or by an import path to a factory
(``torchvision.models:resnet18``). The CLI and checkpoints only ever go through
:func:`create` / :func:`build`, so adding a model never adds an ``if`` anywhere else.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch.nn as nn

from ..errors import CompressorError
from ..registry import Registry

MODELS = Registry("model")


def register(name: str):
    """Decorator: make ``fn(num_classes, in_channels)`` available as ``name``."""
    return MODELS.register(name)


def available() -> list[str]:
    return MODELS.names()


def is_registered(name: str) -> bool:
    return name in MODELS


def resolve(name: str) -> Callable[..., nn.Module]:
    """The factory behind a registry name or a ``module.path:factory`` string."""
    if name in MODELS:
        return MODELS.get(name).target
    if ":" not in name:
        raise CompressorError(
            f"unknown model {name!r}; registered models: {', '.join(available())}; "
            "or give a factory as 'module.path:function'"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CompressorError(f"cannot import {module_name!r} for model {name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CompressorError(f"{module_name!r} has no callable {attr!r} (model {name!r})")
    return factory


def factory_kwargs(name: str, num_classes: int, in_channels: int) -> dict:
    """The keyword arguments ``name``'s factory takes for classes and input channels.

    External factories (torchvision's, a user's) may accept neither; what was passed is
    recorded in the checkpoint so that loading calls the factory the same way.
    """
    params = inspect.signature(resolve(name)).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {}
    if "num_classes" in params or takes_any:
        kwargs["num_classes"] = num_classes
    if "in_channels" in params or (takes_any and is_registered(name)):
        kwargs["in_channels"] = in_channels
    return kwargs


def build(name: str, **kwargs) -> nn.Module:
    model = resolve(name)(**kwargs)
    if not isinstance(model, nn.Module):
        raise CompressorError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def create(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A fresh, dense model for ``num_classes`` outputs and ``in_channels`` input planes."""
    return build(name, **factory_kwargs(name, num_classes, in_channels))


# Importing the families fills the registry.
from . import conv4, resnet, vgg  # noqa: E402,F401
