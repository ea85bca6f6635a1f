"""Criteria decide which channels go; each returns a :class:`~compressor.plan.PruningPlan`.

A criterion is a plain function ``fn(request, config) -> PruningPlan`` registered by name
with its typed settings: a :class:`CriterionConfig` dataclass whose fields carry their
defaults, help, CLI flag and range checks (:func:`option`, from :mod:`compressor.options`), next to
the criterion. The CLI
builds each criterion's option group from the registry and the pipeline passes the config
object through without knowing its fields, so adding a criterion is one file (and its test).
A criterion may train the model on the way (later criteria do), but it never removes
channels: ``surgery.apply`` does that, for every criterion alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..budget import Budget
from ..data import ImageData
from ..errors import CompressorError
from ..options import Settings, flag_dest, option, shown_default  # noqa: F401  (the criteria's, re-exported)
from ..plan import PruningPlan
from ..registry import Registry
from ..resume import RunState, StageState
from ..surgery import Graph, trace
from ..train import TrainConfig

CRITERIA = Registry("method")


@dataclass(frozen=True)
class CriterionConfig(Settings):
    """The settings of one criterion; every field is an :func:`option`. Checked when built."""

    def check_budget(self, metric: str) -> None:
        """Refuse a budget metric these settings cannot meet (called before any data is read)."""


@dataclass(frozen=True)
class NoOptions(CriterionConfig):
    """A criterion without settings of its own (the baselines, Torch-Pruning's importances)."""


@dataclass
class PlanRequest:
    """Everything a criterion may use. Data and device are optional for data-free criteria."""

    model: nn.Module
    example_inputs: torch.Tensor
    budget: Budget
    round_to: int = 8
    max_ratio: float = 0.95
    seed: int = 0
    data: ImageData | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    graph: Graph | None = None
    # how a criterion trains on its way (epochs and seed are set per stage by train_config): the run's batch
    # size, label smoothing and compile, at the fine-tuning rate (the dense one when starting from scratch)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(0, lr=0.01, batch_size=128, schedule="cosine"))
    from_scratch: bool = False  # no dense training before: the criterion trains from random weights
    resume: bool = False  # continue a search saved by an interrupted run (smoea)
    on_progress: Callable | None = None  # called by a search after each saved step (tests interrupt there)
    report: dict = field(default_factory=dict)  # what a criterion found, for metrics.json
    out_dir: Path | None = None  # where a criterion may write its own tables and plots
    state: RunState | None = None  # where training and search progress is kept, to resume a killed run
    train_epochs: int = 0  # epochs the criterion trained: an equal-epochs study counts them against its total

    def stage(self, name: str) -> StageState | None:
        """Where the training stage ``name`` keeps its progress (None: not resumable, e.g. from the API)."""
        return self.state.stage(name) if self.state is not None else None

    def state_dir(self) -> Path | None:
        """Where a criterion keeps its own search state: the run's state folder, else ``out_dir``."""
        return self.state.dir if self.state is not None else self.out_dir

    def traced(self) -> Graph:
        if self.graph is None:
            self.graph = trace(self.model, self.example_inputs)
        return self.graph


def register(name: str, config: type[CriterionConfig] = NoOptions, from_scratch: bool = False):
    """Add a criterion ``fn(request, config)`` with its settings class; ``from_scratch`` if it trains enough to
    start from random weights."""
    return CRITERIA.register(name, config=config, from_scratch=from_scratch)


def available() -> list[str]:
    return CRITERIA.names()


def from_scratch_methods() -> list[str]:
    return [e.name for e in CRITERIA if e.info["from_scratch"]]


def configs_from(given: dict[str, Any]) -> dict[str, CriterionConfig]:
    """Every criterion's config from the option values given by destination name (``{"steps": 2}``); options a
    criterion does not declare are not its business, and an option left out keeps that criterion's default."""
    found = {}
    for entry in CRITERIA:
        cls = entry.info["config"]
        found[entry.name] = cls(**{f.name: given[flag_dest(f.metadata["option"]["flag"])] for f in cls.options()
                                   if flag_dest(f.metadata["option"]["flag"]) in given})
    return found


def declares(method: str, dest: str) -> bool:
    return any(flag_dest(f.metadata["option"]["flag"]) == dest for f in config_class(method).options())


def config_class(method: str) -> type[CriterionConfig]:
    return CRITERIA.get(method).info["config"]


def default_config(method: str) -> CriterionConfig:
    return config_class(method)()


def train_config(request: PlanRequest, epochs: int, seed: int, schedule: str = "cosine") -> TrainConfig:
    """How a criterion trains on its way: the request's training settings, for ``epochs`` from ``seed``."""
    return dataclasses.replace(request.train, epochs=epochs, seed=seed, schedule=schedule)


def make_plan(method: str, request: PlanRequest, config: CriterionConfig | None = None) -> PruningPlan:
    """``method``'s plan for ``request``, with ``config`` (default: the method's defaults), e.g.
    ``make_plan("psap", request, PSAPConfig(threshold=0.4))``."""
    entry = CRITERIA.get(method)
    config = entry.info["config"]() if config is None else config
    if not isinstance(config, entry.info["config"]):
        raise CompressorError(f"{method} takes a {entry.info['config'].__name__}, not a {type(config).__name__}")
    return entry.target(request, config)


def _register_all() -> None:
    """Import every module of this package, so each criterion registers itself: a new one is one new file."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_all()
