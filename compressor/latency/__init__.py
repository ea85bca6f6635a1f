"""Latency as a budget: a per-layer lookup table measured on the target backend, and a model of
the network's latency built on it. One concern a module:

- :mod:`.spec`: what is measured and where (a bench backend, a device, a precision, a batch);
- :mod:`.layers`: the prunable layers as the table sees them, and the single-layer modules timed;
- :mod:`.timing`: modules to callables through the bench's backends, timed by the bench's harness;
- :mod:`.table`: the grid, the table and its cache;
- :mod:`.fit`: the layer weights (scikit-learn's ``Ridge``, strength by leave-one-out);
- :mod:`.model`: :class:`LatencyModel`, the prediction and the whole-model checks;
- :mod:`.solve`: widths measured whole, the target corrected by the miss;
- :mod:`.run`: the pipeline's side (spec from the command line, the Budget, the report).

:class:`LatencyModel` implements :class:`compressor.budget.LatencyCost`; it travels on the
``Budget`` (``Budget.latency``): there is no module-level state.
"""
from .fit import fit_layer_weights
from .layers import LayerSpec, build_layer, layer_specs
from .model import LatencyModel
from .run import budget_from, check_config, prepare, run_metrics
from .solve import AIM, CORRECTIONS, TOLERANCE
from .spec import ENV_CACHE, PRECISIONS, LatencySpec, backend_names, cache_dir, resolve_device
from .table import LatencyTable, group_grid, load_or_measure
from .timing import cold_layers, last_level_cache_bytes, stats

__all__ = ["LatencySpec", "LatencyModel", "LatencyTable", "LayerSpec", "TOLERANCE", "AIM", "CORRECTIONS", "ENV_CACHE",
           "PRECISIONS", "backend_names", "budget_from", "build_layer", "cache_dir", "check_config", "cold_layers",
           "fit_layer_weights", "group_grid", "last_level_cache_bytes", "layer_specs", "load_or_measure", "prepare",
           "resolve_device", "run_metrics", "stats"]
