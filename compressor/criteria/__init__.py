"""Criteria decide which channels go; each returns a :class:`~compressor.plan.PruningPlan`.

A criterion is a plain function ``fn(request) -> PruningPlan`` registered by name. It
may train the model on the way (later criteria do), but it never removes channels:
``surgery.apply`` does that, for every criterion alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..budget import Budget
from ..data import ImageData
from ..errors import CompressorError
from ..plan import PruningPlan
from ..resume import RunState, StageState
from ..surgery import Graph, trace
from ..train import TrainConfig

_CRITERIA: dict[str, Callable[["PlanRequest"], PruningPlan]] = {}
_FROM_SCRATCH: set[str] = set()  # criteria that train enough to start from random weights


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
    options: dict = field(default_factory=dict)  # criterion-specific settings from the CLI
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


def register(name: str, from_scratch: bool = False):
    """Add a criterion; ``from_scratch`` if it trains enough to start from random weights."""
    def wrap(fn):
        _CRITERIA[name] = fn
        if from_scratch:
            _FROM_SCRATCH.add(name)
        return fn

    return wrap


def available() -> list[str]:
    return sorted(_CRITERIA)


def from_scratch_methods() -> list[str]:
    return sorted(_FROM_SCRATCH)


def train_config(request: PlanRequest, epochs: int, seed: int, schedule: str = "cosine") -> TrainConfig:
    """How a criterion trains on its way: the run's batch size and label smoothing, and the rate the
    pipeline chose for it (the fine-tuning rate, or the dense one when starting from scratch)."""
    o = request.options
    return TrainConfig(epochs, lr=float(o.get("lr", 0.01)), batch_size=int(o.get("batch_size", 128)),
                       schedule=schedule, label_smoothing=float(o.get("label_smoothing", 0.0)), seed=seed,
                       compile=bool(o.get("compile", False)))


def make_plan(method: str, request: PlanRequest) -> PruningPlan:
    if method not in _CRITERIA:
        raise CompressorError(f"unknown method {method!r}; available: {', '.join(available())}")
    return _CRITERIA[method](request)


from . import baselines, ffr, peers, psap, sensitivity, smoea  # noqa: E402,F401  (fill the registry)
