"""The pipeline's side of a latency budget: the command line's words to a spec, the spec to a
:class:`~compressor.budget.Budget` carrying its measured model, and the run's report.

Nothing is kept between calls: the model travels on the budget (``Budget.latency``), so two
latency budgets in one process (a study, a Python user) never share a table by accident.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch
import torch.nn as nn

from ..budget import Budget
from ..errors import BudgetError
from .model import LatencyModel
from .spec import LatencySpec, resolve_device


def budget_from(metric: str, value: float, backend: str = "ort-cpu", batch: int = 1, cache: str | None = None,
                step: int | None = None, precision: str = "fp32", device: str | None = None) -> Budget | LatencySpec:
    """The run's budget: a :class:`Budget` for ``macs``/``params``; for ``latency`` (value: fraction of the
    dense latency) or ``latency_ms`` (value: milliseconds) a :class:`LatencySpec`, checked, that
    :func:`prepare` turns into a Budget once the model is traced and measured."""
    if metric not in ("latency", "latency_ms"):
        return Budget(metric, value)
    from ..checks import number

    if metric == "latency":
        number("--budget-latency", value, low=0, high=1, low_open=True)
    else:
        number("--budget-ms", value, low=0, low_open=True)
    spec = LatencySpec(backend, batch, precision, cache_dir=cache, step=step,
                       target_ms=value if metric == "latency_ms" else None)
    from ..train import pick_device

    resolve_device(spec, pick_device(device or "auto"))  # on the device the run will use
    return replace(spec, fraction=value) if metric == "latency" else spec


def check_config(config) -> None:
    """RunConfig.validate's part for budgets (latency ones included)."""
    budget_from(config.budget_metric, config.budget, config.latency_backend, config.latency_batch,
                config.latency_cache, config.latency_step, config.latency_precision, config.device)


def prepare(budget: Budget | LatencySpec, graph, device: torch.device | None = None, round_to: int = 8,
            max_ratio: float = 0.95, model: LatencyModel | None = None) -> Budget:
    """A MAC or parameter budget as it is; a latency spec measured (or loaded) into its model, an absolute
    target in ms resolved to a fraction of the dense latency: the Budget the criteria get. ``model``: one
    already measured for this graph, backend, batch and precision (a study's cells share it)."""
    if isinstance(budget, Budget):
        return budget
    spec = budget
    if model is not None:
        model.check_prices(graph)
        s = model.spec
        given = (s.bench_backend, model.device.type, s.batch, s.precision, s.step, s.threads, model.round_to,
                 model.max_ratio)
        wanted = (spec.bench_backend, resolve_device(spec, device).type, spec.batch, spec.precision, spec.step,
                  spec.threads, round_to, max_ratio)
        if given != wanted:
            raise BudgetError(f"the latency model given was measured for (backend, device, batch, precision, step, "
                              f"threads, round_to, max_ratio) = {given}, not {wanted}")
    else:
        model = LatencyModel(graph, spec, round_to, max_ratio, device)
    fraction = spec.fraction if spec.fraction is not None else 1.0
    if spec.target_ms is not None:
        fraction = spec.target_ms / model.dense_ms
        if fraction > 1.0:
            raise BudgetError(f"--budget-ms {spec.target_ms:g} is above the dense model's own latency "
                              f"({model.dense_ms:.4f} ms on {spec.backend} at batch {spec.batch}): nothing to prune")
        spec.log(f"{spec.target_ms:g} ms is {fraction:.3f} of the dense {model.dense_ms:.4f} ms")
    return Budget("latency", fraction, latency=model)


def run_metrics(budget: Budget, pruned_model: nn.Module, dense_cost, pruned_cost) -> dict:
    """``{"latency": ...}`` for metrics.json (empty for other budgets): target, predicted, measured and dense
    latency, the MAC ratio beside the latency ratio, the model's error and the solver's steps."""
    lat = budget.latency
    if budget.metric != "latency" or lat is None:
        return {}
    measured = lat.measure({"pruned": copy.deepcopy(pruned_model).cpu().eval()})
    widths = lat.widths_of(pruned_model)
    predicted = lat.fraction(widths) if widths else None
    fraction = measured["fraction"]["pruned"]
    spec = lat.spec
    out = {"target": {"fraction": budget.fraction, "ms": budget.fraction * lat.dense_ms, "given_ms": spec.target_ms},
           "dense_ms": measured["ms"]["dense"], "measured_ms": measured["ms"]["pruned"], "measured_fraction": fraction,
           "predicted_fraction": predicted, "predicted_ms": predicted * lat.dense_ms if predicted else None,
           "within_tolerance": abs(fraction - budget.fraction) <= budget.tolerance,
           "mac_fraction": pruned_cost.macs / dense_cost.macs,
           "params_fraction": pruned_cost.params / dense_cost.params,
           "speedup": 1.0 / fraction if fraction else None, "model": lat.report,
           "solver": lat.solves[-1] if lat.solves else None}
    spec.log(f"pruned model: {fraction:.3f} of dense latency measured ({measured['ms']['pruned']:.4f} ms), "
             f"target {budget.fraction:.3f}, MACs {out['mac_fraction']:.3f}")
    return {"latency": out}
