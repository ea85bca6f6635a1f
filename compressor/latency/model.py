"""The latency model: ``latency(w) = sum_layers a_l * table_l(w) + beta``.

``beta`` makes the model exact at the dense widths (it absorbs what is not a prunable layer, and
removes the per-call overhead each single-layer timing counts once more). The weights ``a_l``
come from whole-model measurements at random widths (:mod:`.fit`). ``a_l = 1`` is the plain "sum
plus a constant" model; the errors of it, of one shared weight and of the per-layer weights are
reported, measured on random width configurations that were not used for fitting.

A :class:`LatencyModel` prices one traced graph on one backend, batch and precision: it is
what a ``latency`` :class:`~compressor.budget.Budget` carries (``Budget.latency``), and it
implements :class:`compressor.budget.LatencyCost`.
"""
from __future__ import annotations

import copy
import math
import random
import statistics
import time

import torch
import torch.nn as nn

from ..budget import allowed_widths
from ..errors import BudgetError
from ..plan import PruningPlan
from ..provenance import device_name
from ..surgery import pruned_copy
from . import solve
from .fit import fit_layer_weights
from .layers import layer_specs, layer_widths
from .spec import LatencySpec, resolve_device
from .table import LatencyTable, group_grid, load_or_measure
from .timing import Timer, cold_layers


class LatencyModel:
    """Predicted latency of the traced model at any group widths, and whole-model measurements."""

    def __init__(self, graph, spec: LatencySpec, round_to: int = 8, max_ratio: float = 0.95,
                 device: torch.device | None = None, table: LatencyTable | None = None, measure: bool = True):
        self.graph, self.spec = graph, spec
        self.device = resolve_device(spec, device)
        self.full = graph.widths()
        self.names = graph.names()
        self.round_to, self.max_ratio = round_to, max_ratio
        self.layers = layer_specs(graph)
        self.timer = Timer(spec, self.device)
        self.cold = cold_layers(graph.model, spec, self.device)
        if spec.step or table is not None:  # --latency-step: a fixed grid
            step = spec.step or round_to
            self.grids = {g.name: group_grid(g, g.width, step, round_to, max_ratio) for g in graph.groups}
        else:  # a coarse grid, refined where the latency steps
            self.grids = None
        self.table = table or load_or_measure(
            self.layers, self.full, spec, self.device, self.timer, self.cold, grids=self.grids,
            allowed={g.name: allowed_widths(g.width, round_to, max_ratio, g) for g in graph.groups})
        self.grids = self.grids or self.table.key["grids"]
        self.alpha, self.beta = 1.0, 0.0
        self.weights = {s.name: 1.0 for s in self.layers}  # a_l: each layer's weight in the model
        self.dense_ms = self.sum_ms(self.full)
        self.dense_model = copy.deepcopy(graph.model).cpu().eval()
        self.example = graph.example_inputs[:1].detach().cpu()
        self.report: dict = {"backend": spec.backend, "batch": spec.batch, "precision": spec.precision,
                             "device": device_name(self.device), "table": self.table.paths,
                             "table_from_cache": not self.table.measured, "table_seconds": self.table.seconds,
                             "table_points": self.table.points,
                             "cold_caches": self.cold, "grid": self.grids, "tolerance": solve.TOLERANCE}
        self.solves: list[dict] = []
        if measure:
            self.fit()

    def check_prices(self, graph) -> None:
        """Refuse a graph this model was not built for (its groups' names, or wider than it)."""
        widths = graph.widths()
        shape = tuple(graph.example_inputs.shape[1:])
        if shape != tuple(self.example.shape[1:]):
            raise BudgetError(f"this latency budget's model was measured at input {tuple(self.example.shape[1:])}, "
                              f"not {shape}")
        if set(widths) != set(self.full) or any(widths[g] > self.full[g] for g in widths):
            raise BudgetError("this latency budget's model was measured for another network (its groups "
                              f"{sorted(self.full)[:4]}...); build one for this graph with compressor.latency.prepare")

    # --- prediction
    def sum_ms(self, widths: dict[str, int]) -> float:
        return sum(self.layer_ms(widths).values())

    def layer_ms(self, widths: dict[str, int]) -> dict[str, float]:
        """Each layer's table latency at ``widths``."""
        return {s.name: self.table.lookup(s.name, *layer_widths(s, widths, self.full)) for s in self.layers}

    def predict_ms(self, widths: dict[str, int]) -> float:
        return sum(self.weights[n] * ms for n, ms in self.layer_ms(widths).items()) + self.beta

    def fraction(self, widths: dict[str, int]) -> float:
        return self.predict_ms(widths) / self.predict_ms(self.full)

    # --- whole-model measurements
    def _pruned(self, widths: dict[str, int]) -> nn.Module:
        if all(widths[g] == self.full[g] for g in self.full):
            return copy.deepcopy(self.dense_model)
        plan = PruningPlan.first_channels(widths, self.graph)
        return pruned_copy(self.graph.model, plan, self.graph.example_inputs).cpu().eval()

    def measure(self, configs: dict[str, dict[str, int] | nn.Module]) -> dict:
        """Whole models timed interleaved with the dense one: ms and fraction of dense, per name."""
        shape = tuple(self.example.shape)
        calls = {"dense": self.timer.callable(self.dense_model, shape)}
        for name, c in configs.items():
            model = c if isinstance(c, nn.Module) else self._pruned(c)
            calls[name] = self.timer.callable(model.cpu().eval(), shape)
        return self.timer.compare(calls)

    def check(self, widths: dict[str, int]) -> dict:
        measured = self.measure({"pruned": widths})
        return {"fraction": measured["fraction"]["pruned"], "ms": measured["ms"]["pruned"],
                "dense_ms": measured["ms"]["dense"]}

    def random_widths(self, rng: random.Random) -> dict[str, int]:
        return {g: rng.choice(self.grids[g]) for g in self.full}

    def fit(self) -> None:
        """Dense latency, the layer weights and beta from calibration measurements, and the model's error on
        random configurations not used for fitting."""
        rng = random.Random(0)
        uniform = {g: min(self.grids[g], key=lambda w: abs(w - self.full[g] / 2)) for g in self.full}
        k = self.spec.calibrate if self.spec.calibrate is not None else min(40, max(8, 2 * len(self.layers)))
        calib = ([uniform] + [self.random_widths(rng) for _ in range(max(0, k - 1))])[:k]
        valid = [self.random_widths(rng) for _ in range(self.spec.validate)]
        configs = {f"calib{i}": w for i, w in enumerate(calib)} | {f"valid{i}": w for i, w in enumerate(valid)}
        t0 = time.perf_counter()
        result = self.measure(configs)
        dense = result["ms"]["dense"]
        names = [s.name for s in self.layers]
        base = self.layer_ms(self.full)

        def features(w):  # each layer's table change from the dense widths
            ms = self.layer_ms(w)
            return [ms[n] - base[n] for n in names]

        xs = [features(w) for w in calib]
        ys = [result["fraction"][f"calib{i}"] * dense - dense for i in range(len(calib))]
        fit = fit_layer_weights(xs, ys)
        models = {"sum_plus_constant": [1.0] * len(names), "shared_weight": [fit["alpha"]] * len(names),
                  "per_layer": fit["weights"]}
        errors = {}
        for label, weights in models.items():
            rel = []
            for i, w in enumerate(valid):
                pred = (sum(a * x for a, x in zip(weights, features(w))) + dense) / dense
                real = result["fraction"][f"valid{i}"]
                rel.append(abs(pred - real) / real)
            errors[label] = {"mean": statistics.fmean(rel) if rel else None, "max": max(rel) if rel else None,
                             "configs": len(rel)}
        errors["calibrated"] = errors["per_layer"]  # the model in use (its weights may all be alpha)
        self.alpha = fit["alpha"]
        self.weights = dict(zip(names, fit["weights"]))
        self.beta = dense - sum(self.weights[n] * base[n] for n in names)
        self.dense_ms = dense
        s_dense = sum(base.values())
        self.report.update({"dense_ms": dense, "sum_of_layers_ms": s_dense, "alpha": fit["alpha"],
                            "layer_weights": self.weights, "ridge": fit["ridge"], "loo_error_ms": fit["loo"],
                            "beta_ms": self.beta, "calibration_configs": len(calib), "model_error": errors,
                            "fit_seconds": time.perf_counter() - t0})
        err = errors["calibrated"]
        if err["mean"] is not None:
            self.spec.log(f"dense {dense:.4f} ms on {self.spec.backend} at batch {self.spec.batch}; layers sum to "
                          f"{s_dense:.4f} ms; alpha {fit['alpha']:.3f}, per-layer ridge {fit['ridge']}; model error "
                          f"on {err['configs']} random widths: mean {err['mean']:.1%}, max {err['max']:.1%} "
                          f"(shared weight: mean {errors['shared_weight']['mean']:.1%}; plain sum+constant: mean "
                          f"{errors['sum_plus_constant']['mean']:.1%})")

    # --- the solver's pieces (compressor.budget.LatencyCost)
    def on_grid(self, allowed: dict[str, list[int]]) -> dict[str, list[int]]:
        """Each group's allowed widths the table measured (others it only interpolates)."""
        return {g: [w for w in widths if w in self.grids.get(g, ())] or list(widths) for g, widths in allowed.items()}

    def choices(self, allowed: dict[str, list[int]], context: dict[str, int] | None = None) -> dict[str, list[int]]:
        """Each group's widths on the measured grid, less those no faster than a wider one, the other groups at
        ``context`` (default: dense). The context matters: a layer's time depends on its neighbours' widths, so
        on ResNet-20 a narrow first-stage conv is no faster beside dense neighbours but saves time beside pruned
        ones; judged at dense only, the solver kept those convs whole and cut the residual streams instead."""
        context = {**self.full, **(context or {})}
        out = {}
        for g, widths in self.on_grid(allowed).items():
            kept, best = [], math.inf
            for w in sorted(widths, reverse=True):
                ms = self.predict_ms({**context, g: w})
                if ms < best or w == self.full[g]:
                    kept.append(w)
                    best = min(best, ms)
            out[g] = sorted(kept)
        return out

    def solve(self, budget, search, choices) -> tuple[dict[str, int], dict]:
        """Widths for ``budget``: solved, measured whole, corrected by the miss (:func:`.solve.solve`)."""
        widths, report = solve.solve(self, budget, search, choices)
        self.solves.append(report)
        return widths, report

    def widths_of(self, pruned: nn.Module) -> dict[str, int] | None:
        """The group widths of a pruned copy of this model (None when its layers cannot be found)."""
        try:
            found = {}
            for g in self.full:
                m = pruned.get_submodule(g)
                found[g] = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            return found
        except AttributeError:
            return None
