"""Model registry, in the manner of timm's ``create_model``.

A model is named either by a registry name (``vgg16``) or by an import path to a factory
(``torchvision.models:resnet18``). The CLI and checkpoints only ever go through
:func:`create` / :func:`build`, so adding a model never adds an ``if`` anywhere else.

A name the user types (``--model pkg.mod:net``) is theirs to run. A name read from a file
(a checkpoint's spec, a run's saved settings) is not: the file would choose what is imported
and called. :func:`check_trusted` admits such a name only if it is registered here, is one of
torchvision's classification builders (:data:`ZOOS`), or is one the caller trusts for this
load (``--trust-factory``, ``trusted_factories=``); it decides before anything is imported.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable, Iterable

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
    if not module_name or not attr:
        raise CompressorError(f"model {name!r}: a factory is named 'module.path:function', both parts given")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CompressorError(f"cannot import {module_name!r} for model {name!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a module that fails while importing
        raise CompressorError(f"importing {module_name!r} for model {name!r} failed with {type(exc).__name__}: "
                              f"{exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CompressorError(f"{module_name!r} has no callable {attr!r} (model {name!r})")
    return factory


def factory_kwargs(name: str, num_classes: int, in_channels: int) -> dict:
    """The keyword arguments ``name``'s factory takes for classes and input channels.

    External factories (torchvision's, a user's) may accept neither; what was passed is
    recorded in the checkpoint so that loading calls the factory the same way.
    """
    try:
        params = inspect.signature(resolve(name)).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass nothing it may not take
        return {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {}
    if "num_classes" in params or takes_any:
        kwargs["num_classes"] = num_classes
    if "in_channels" in params or (takes_any and is_registered(name)):
        kwargs["in_channels"] = in_channels
    return kwargs


def build(name: str, **kwargs) -> nn.Module:
    """Call ``name``'s factory; a factory that raises is one clear error naming it."""
    factory = resolve(name)
    try:
        model = factory(**kwargs)
    except CompressorError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's factory can raise anything
        detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise CompressorError(f"model factory {name!r} failed with {type(exc).__name__}: {detail} "
                              f"(called with {kwargs})") from None
    if not isinstance(model, nn.Module):
        raise CompressorError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


# Model zoos whose builders a file may name without the caller's say-so: module -> its builder names.
# torchvision's classification models only (list_models(module=torchvision.models)); its detection,
# segmentation and video builders take other inputs than one image batch.
ZOOS: dict[str, Callable[[], set[str]]] = {}


def _torchvision_classification() -> set[str]:
    import torchvision.models as zoo

    return set(zoo.list_models(module=zoo))


ZOOS["torchvision.models"] = _torchvision_classification
MAX_KWARGS_TEXT = 10_000  # characters of a file's factory arguments, as JSON


def trusted_names(trusted) -> tuple[str, ...]:
    """A caller's ``trusted_factories``, checked: a list of ``"module.path:function"`` names."""
    if trusted is None:
        return ()
    if isinstance(trusted, str) or not isinstance(trusted, (list, tuple, set, frozenset)):
        raise CompressorError(f"trusted_factories is a list of 'module.path:function' names, not {trusted!r}")
    bad = [t for t in trusted if not isinstance(t, str) or t.count(":") != 1 or t.startswith(":") or t.endswith(":")]
    if bad:
        raise CompressorError(f"trusted_factories takes 'module.path:function' names, not {bad[0]!r}")
    return tuple(trusted)


def is_trusted(name, trusted: Iterable[str] = ()) -> bool:
    """Whether a file may name ``name``: registered, a known zoo's builder, or in ``trusted``."""
    if not isinstance(name, str):
        return False
    if name in MODELS or name in set(trusted):
        return True
    module, sep, attr = name.partition(":")
    return bool(sep) and module in ZOOS and attr in ZOOS[module]()


def check_trusted(name, trusted: Iterable[str] = (), where: str = "the file") -> None:
    """Refuse, before any import, a factory named by a file that nobody trusted for this load."""
    if is_trusted(name, trusted):
        return
    if not isinstance(name, str) or not name:
        raise CompressorError(f"{where} names no model (got {name!r})")
    raise CompressorError(
        f"{where} names the model factory {name!r}, which is neither a registered model "
        f"({', '.join(available())}) nor a torchvision classification model; building it would import and call "
        f"code that the file chose, so it is refused. If you trust that code, say so for this load: "
        f"--trust-factory {name} (Python: trusted_factories=[{name!r}])")


def _plain(value, depth: int = 0) -> bool:
    """JSON's own values: no object of any class can reach a factory through them."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= 4:
        return False
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    return False


def check_kwargs(name: str, kwargs, where: str = "the file") -> dict:
    """A file's factory arguments: plain JSON values, each one a keyword the factory takes.

    ``weights`` must stay None: the file carries its weights, and a named weight set would be
    downloaded at load time.
    """
    import json

    if not isinstance(kwargs, dict):
        raise CompressorError(f"{where}: the factory arguments of {name!r} are not a JSON object")
    bad = [k for k, v in kwargs.items() if not isinstance(k, str) or not k.isidentifier() or not _plain(v)]
    if bad:
        raise CompressorError(f"{where}: the factory arguments of {name!r} must be plain JSON values under "
                              f"keyword names; refused: {', '.join(map(repr, bad[:5]))}")
    if len(json.dumps(kwargs)) > MAX_KWARGS_TEXT:
        raise CompressorError(f"{where}: the factory arguments of {name!r} are over {MAX_KWARGS_TEXT} characters")
    if kwargs.get("weights") is not None:
        raise CompressorError(f"{where}: {name!r} is asked for weights={kwargs['weights']!r}, which would download "
                              "them; a checkpoint carries its own weights (weights must be null)")
    try:
        params = inspect.signature(resolve(name)).parameters
    except (TypeError, ValueError):
        raise CompressorError(f"{where}: the model factory {name!r} has no signature to check arguments "
                              "against") from None
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = sorted(set(kwargs) - named)
        if unknown:
            raise CompressorError(f"{where}: the model factory {name!r} takes no argument "
                                  f"{', '.join(unknown)} (it takes {', '.join(sorted(named)) or 'none'})")
    return kwargs


def build_trusted(name, kwargs, trusted: Iterable[str] = (), where: str = "the file") -> nn.Module:
    """Build a model that a file names, under :func:`check_trusted` and :func:`check_kwargs`."""
    check_trusted(name, trusted, where)
    return build(name, **check_kwargs(name, kwargs, where))


def create(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A fresh, dense model for ``num_classes`` outputs and ``in_channels`` input planes."""
    return build(name, **factory_kwargs(name, num_classes, in_channels))


# Importing the families fills the registry.
from . import conv4, resnet, vgg  # noqa: E402,F401
