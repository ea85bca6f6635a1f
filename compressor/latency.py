"""Latency as a budget: a per-layer lookup table measured on the target backend, and a model of
the network's latency built on it.

*The table.* Every prunable layer (conv/linear, with the BatchNorm, activation and pooling
layers that run right after it on its output) is rebuilt alone at a grid of (input, output)
channel counts and timed on the target backend at the layer's own input size and the
budget's batch: in ONNX Runtime for ``ort-cpu``/``ort-cuda`` (a fixed-batch ONNX export of
the single-layer module), in PyTorch for ``eager``/``compile``, in TensorRT for ``trt``. A point
is the fastest of ``table_iters`` calls; on a CPU, when the model's weights overflow half the
last-level cache, every call starts with flushed caches (inside such a model each layer finds
its weights evicted by the others': timed hot, VGG-16's layers summed to 5.4 ms against 9.1 ms
for the whole model at batch 1 on one core; timed cold, 8.9 ms). The
grid is each group's own: multiples of ``step`` (default: ``--round-to``), made finer where a
group would have fewer than :data:`MIN_POINTS` widths, plus the full width. Between grid
points (a layer after a concatenation or a flatten) the table interpolates bilinearly.

*The model.* ``latency(w) = sum_layers a_l * table_l(w) + beta``. ``beta`` makes the model exact
at the dense widths (it absorbs what is not a prunable layer, and removes the per-call overhead
each single-layer timing counts once more). The weights come from whole-model measurements at
random widths (calibration), since separately timed layers miss how the whole graph runs
(fusions, caches, threads): one shared ``a_l = alpha`` fitted by least squares through the dense
point, or one weight per layer, ridge-regressed towards ``alpha``, with the ridge strength
(infinite included: the shared weight) chosen by leave-one-out error on the calibration
measurements. ``a_l = 1`` is the plain "sum plus a constant" model; the errors of all three are
reported, measured on random width configurations that were not used for fitting.

*The cache.* Tables are JSON files in ``--latency-cache``, else ``$COMPRESSOR_LATENCY_CACHE``,
else ``$XDG_CACHE_HOME/compressor/latency`` (``~/.cache/compressor/latency``). The file name
is a hash of what is measured (layer shapes, grid, backend, batch, precision, threads); the
file holds the full key, which adds where and with what it was measured (device name,
library versions). A file whose key differs is never used: the table is measured again, with
a message saying what changed, and the file replaced.

*The solver* (``budget.solve_widths`` with a ``latency`` budget): the criterion's per-group
ratios are scaled by bisection against the model's predicted latency, over widths on the
measured grid from which each group's *dominated* widths are removed (a width that is no
faster than a wider one of the same group, other groups at full width: widths the backend
runs badly are avoided because they were measured). The result is then measured whole on the
backend, interleaved with the dense model; unless it lands within half the tolerance
(:data:`TOLERANCE`, relative; :data:`AIM`: the other half is headroom for the next timing's
noise), the target is corrected by the miss and the widths solved again, up to
:data:`CORRECTIONS` times, each step printed and recorded; the closest plan wins.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import platform
import random
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .errors import BudgetError, CompressorError

BACKENDS = ("ort-cpu", "ort-cuda", "eager", "compile", "trt")
PRECISIONS = ("fp32", "fp16")
ENV_CACHE = "COMPRESSOR_LATENCY_CACHE"
TOLERANCE = 0.10  # the measured latency must land within 10% of the target (relative)
CORRECTIONS = 4  # solves at most: the first plus three corrected targets
AIM = 0.5  # a solve is accepted at once within AIM x the tolerance: the rest is headroom for timing noise
MIN_POINTS = 4  # a group's grid has at least this many widths (where it has as many legal ones)
TABLE_VERSION = 1
FOLLOWERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU,
             nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)

stats = {"points": 0, "models": 0}  # timings taken in this process (tests read them)


# ----------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class LatencySpec:
    """Where and how latency is measured, and what an absolute target (``target_ms``) is."""

    backend: str = "ort-cpu"
    batch: int = 1
    precision: str = "fp32"
    cache_dir: str | None = None
    step: int | None = None  # grid step in channels (default: the solver's round_to)
    target_ms: float | None = None  # --budget-ms; None for a fraction of the dense latency
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default) / torch threads for eager
    table_iters: int = 10  # timed calls per table point (median), after 2 warm-up calls
    check_seconds: float = 1.0  # whole-model checks: interleaved timing per comparison
    validate: int = 3  # random width configurations the model's error is measured on
    calibrate: int | None = None  # whole-model measurements the weights are fitted on (None: 2 per layer, 8 to 40)
    verbose: bool = True

    def __post_init__(self):
        check_spec(self)


def check_spec(spec: LatencySpec) -> None:
    from .checks import number

    if spec.backend not in BACKENDS:
        raise CompressorError(f"--latency-backend must be one of {', '.join(BACKENDS)}, not {spec.backend!r}")
    if spec.precision not in PRECISIONS:
        raise CompressorError(f"latency precision must be one of {', '.join(PRECISIONS)}, not {spec.precision!r}")
    number("--latency-batch", spec.batch, integer=True, low=1)
    number("--latency-step", spec.step, integer=True, low=1, optional=True)
    number("--budget-ms", spec.target_ms, low=0, low_open=True, optional=True)
    number("latency threads", spec.threads, integer=True, low=1, optional=True)
    number("latency table_iters", spec.table_iters, integer=True, low=1)
    number("latency validate", spec.validate, integer=True, low=0)
    number("latency calibrate", spec.calibrate, integer=True, low=0, optional=True)


def check_backend(backend: str, device: torch.device | None = None) -> torch.device:
    """The device ``backend`` runs on here, or one clear error saying why it cannot run."""
    if backend not in BACKENDS:
        raise CompressorError(f"--latency-backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    cuda = torch.cuda.is_available()
    if backend in ("ort-cpu", "ort-cuda"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CompressorError(f"--latency-backend {backend} needs onnxruntime: pip install onnxruntime") from None
        if backend == "ort-cpu":
            return torch.device("cpu")
        if not cuda or "CUDAExecutionProvider" not in ort.get_available_providers():
            raise CompressorError(
                "--latency-backend ort-cuda needs a CUDA GPU and onnxruntime-gpu; this machine has "
                f"{'a GPU' if cuda else 'no CUDA GPU'} and onnxruntime providers "
                f"{', '.join(ort.get_available_providers())} (use ort-cpu or eager here)")
        return torch.device("cuda")
    if backend == "trt":
        from .export import tensorrt

        if not tensorrt.available():
            raise CompressorError("--latency-backend trt needs TensorRT (pip install tensorrt) and a CUDA GPU")
        if not cuda:
            raise CompressorError("--latency-backend trt needs a CUDA GPU; this machine has none")
        return torch.device("cuda")
    # eager / compile: the run's device, or the GPU where there is one
    device = torch.device(device) if device is not None else torch.device("cuda" if cuda else "cpu")
    if backend == "compile" and device.type == "cpu":
        import shutil

        if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
            raise CompressorError("--latency-backend compile on a CPU needs a C++ compiler (torch.compile's inductor)")
    return device


def cache_dir(given: str | None = None) -> Path:
    """--latency-cache, else $COMPRESSOR_LATENCY_CACHE, else $XDG_CACHE_HOME/compressor/latency."""
    if given:
        return Path(given).expanduser()
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "compressor" / "latency"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def library_versions(backend: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"torch": torch.__version__}
    names = {"ort-cpu": ["onnxruntime"], "ort-cuda": ["onnxruntime-gpu", "onnxruntime"], "trt": ["tensorrt"]}
    for dist in names.get(backend, []):
        try:
            found[dist] = version(dist)
            break
        except PackageNotFoundError:
            continue
    if backend.startswith("ort") and len(found) == 1:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
    if torch.cuda.is_available() and backend != "ort-cpu":
        found["cuda"] = torch.version.cuda
    return found


def _log(spec: LatencySpec, message: str) -> None:
    if spec.verbose:
        print(f"latency: {message}", flush=True)


# ----------------------------------------------------------------------------------------------- layers


@dataclass
class LayerSpec:
    """One prunable layer as the table sees it: what it is, its input, and which groups set its widths."""

    name: str
    kind: str  # "conv" or "linear"
    config: dict  # conv: kernel_size, stride, padding, dilation, groups, bias, padding_mode; linear: bias
    in_full: int
    out_full: int
    input_shape: list[int]  # per sample, without the channel dim (conv: [H, W]; linear: leading dims)
    in_groups: list[str]
    out_groups: list[str]
    depthwise: bool = False
    followers: list[dict] = field(default_factory=list)  # [{"type": "BatchNorm2d"}, {"type": "MaxPool2d", ...}]

    def shape_key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("in_groups", "out_groups")}


def _follower(module: nn.Module) -> dict | None:
    kind = type(module).__name__
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return {"type": kind}
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return {"type": kind, "kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding}
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return {"type": kind, "output_size": module.output_size}
    if isinstance(module, nn.LeakyReLU):
        return {"type": kind, "negative_slope": module.negative_slope}
    return {"type": kind}


def _make_follower(f: dict, width: int) -> nn.Module:
    kind = f["type"]
    if kind in ("BatchNorm1d", "BatchNorm2d"):
        return getattr(nn, kind)(width)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return getattr(nn, kind)(f["kernel_size"], f["stride"], f["padding"])
    if kind == "AdaptiveAvgPool2d":
        return nn.AdaptiveAvgPool2d(f["output_size"])
    if kind == "LeakyReLU":
        return nn.LeakyReLU(f["negative_slope"])
    return getattr(nn, kind)()


def layer_specs(graph, batch: int = 1) -> list[LayerSpec]:
    """The prunable layers of a traced model, with their inputs' sizes and the groups that size them."""
    model, x = graph.model, graph.example_inputs[:1]
    names = {m: n for n, m in model.named_modules()}
    sides: dict[str, dict[str, set[str]]] = {}
    for g in graph.groups:
        for layer, side in g.members:
            sides.setdefault(layer, {"out": set(), "in": set()})[side].add(g.name)
    order: list[tuple[str, nn.Module, tuple]] = []
    handles = []

    def hook(module, inputs, _output):
        if inputs and isinstance(inputs[0], torch.Tensor):
            order.append((names[module], module, tuple(inputs[0].shape)))

    for m in model.modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    specs, seen = [], set()
    for i, (name, module, shape) in enumerate(order):
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or name in seen:
            continue
        seen.add(name)
        side = sides.get(name, {"out": set(), "in": set()})
        out_groups = sorted(side["out"])
        in_groups = sorted(side["in"] - side["out"])
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
            config = {"kernel_size": list(module.kernel_size), "stride": list(module.stride),
                      "padding": list(module.padding) if not isinstance(module.padding, str) else module.padding,
                      "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
                      "padding_mode": module.padding_mode}
            spec = LayerSpec(name, "conv", config, module.in_channels, module.out_channels, list(shape[2:]),
                             in_groups, out_groups, depthwise)
        else:
            spec = LayerSpec(name, "linear", {"bias": module.bias is not None}, module.in_features,
                             module.out_features, list(shape[1:-1]), in_groups, out_groups)
        for _, nxt, _ in order[i + 1:]:  # what runs right after it on its channels
            if not isinstance(nxt, FOLLOWERS):
                break
            if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)) and nxt.num_features != spec.out_full:
                break
            if spec.kind == "linear" and isinstance(nxt, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                break
            spec.followers.append(_follower(nxt))
        specs.append(spec)
    return specs


def group_grid(group, full: int, step: int, round_to: int, max_ratio: float) -> list[int]:
    """The widths of ``group`` the table measures (and the latency solver may choose): its allowed
    widths on multiples of ``step``, made finer (halving the step, not below round_to) where that leaves
    fewer than :data:`MIN_POINTS`, plus the full width."""
    from .budget import allowed_widths

    allowed = allowed_widths(full, round_to, max_ratio, group)
    step = max(step, round_to)
    while True:
        grid = sorted({w for w in allowed if w % step == 0} | {full})
        if len(grid) >= min(MIN_POINTS, len(allowed)) or step <= round_to:
            return grid
        step = max(round_to, (step // 2) // round_to * round_to or round_to)


def _axis(groups: list[str], full_ch: int, grids: dict[str, list[int]], full: dict[str, int]) -> list[int]:
    """Channel counts of a layer side driven by ``groups``, at the groups' grid points."""
    if not groups:
        return [full_ch]
    if len(groups) == 1:
        g = groups[0]
        return sorted({max(1, round(full_ch * w / full[g])) for w in grids[g]})
    total = sum(full[g] for g in groups)  # a concatenation: shares on the finest of its groups' grids
    n = max(len(grids[g]) for g in groups)
    least = sum(min(grids[g]) for g in groups) / total
    shares = [least + (1 - least) * k / (n - 1) for k in range(n)] if n > 1 else [1.0]
    return sorted({max(1, round(full_ch * s)) for s in shares})


def _share(groups, widths, full) -> float:
    return sum(widths[g] for g in groups) / sum(full[g] for g in groups) if groups else 1.0


def layer_widths(spec: LayerSpec, widths: dict[str, int], full: dict[str, int]) -> tuple[float, float]:
    """(input, output) channel counts of the layer at group ``widths`` (not rounded: table coordinates)."""
    out = spec.out_full * _share(spec.out_groups, widths, full)
    cin = out if spec.depthwise else spec.in_full * _share(spec.in_groups, widths, full)
    return cin, out


def build_layer(spec: LayerSpec, cin: int, cout: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The single-layer module at (cin, cout) channels and its input shape at batch 1."""
    if spec.kind == "linear":
        layers: list[nn.Module] = [nn.Linear(cin, cout, bias=spec.config["bias"])]
        shape = (1, *spec.input_shape, cin)
    else:
        c = spec.config
        groups = c["groups"]
        if spec.depthwise:
            cin = groups = cout
        elif groups > 1:
            cin, cout = -(-cin // groups) * groups, -(-cout // groups) * groups
        padding = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
        layers = [nn.Conv2d(cin, cout, tuple(c["kernel_size"]), tuple(c["stride"]), padding, tuple(c["dilation"]),
                            groups, c["bias"], c["padding_mode"])]
        shape = (1, cin, *spec.input_shape)
    layers += [_make_follower(f, cout) for f in spec.followers]
    module = nn.Sequential(*layers).eval()
    for m in module.modules():  # BN statistics that are not the identity, as in a trained model
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return module, shape


# ----------------------------------------------------------------------------------------------- runners


class Runner:
    """Turns a module into a callable on the backend and times it."""

    def __init__(self, spec: LatencySpec, device: torch.device):
        self.spec, self.device = spec, device
        self.dtype = torch.float16 if spec.precision == "fp16" else torch.float32
        self._tmp = None

    def callable(self, module: nn.Module, shape: tuple[int, ...]):
        """A no-argument callable that runs ``module`` on a fixed random batch of ``spec.batch``."""
        backend = self.spec.backend
        shape = (self.spec.batch, *shape[1:])
        module = copy.deepcopy(module).eval()
        if backend in ("ort-cpu", "ort-cuda"):
            return self._ort(module, shape)
        if backend == "trt":
            return self._trt(module, shape)
        module = module.to(self.device, self.dtype)
        x = torch.randn(shape, device=self.device, dtype=self.dtype)
        if self.device.type == "cuda" and x.dim() == 4:
            module = module.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if backend == "compile":
            module = torch.compile(module, dynamic=False)

        def call():
            with torch.inference_mode():
                return module(x)

        return call

    def _onnx_bytes(self, module: nn.Module, shape, dynamic: bool = False) -> bytes:
        from .export import onnx as onnx_export

        x = torch.randn(shape)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with onnx_export._quiet():
                    torch.onnx.export(module.float().cpu(), (x,), buf, dynamo=False, opset_version=17,
                                      input_names=[onnx_export.INPUT], output_names=[onnx_export.OUTPUT],
                                      dynamic_axes={onnx_export.INPUT: {0: "batch"}, onnx_export.OUTPUT: {0: "batch"}}
                                      if dynamic else None)
                data = buf.getvalue()
            except Exception:  # noqa: BLE001 - the library's exporter has the dynamo fallback
                with tempfile.TemporaryDirectory() as tmp:
                    path = onnx_export.export(module, Path(tmp) / "m.onnx", x[:1])
                    data = path.read_bytes()
        if self.spec.precision == "fp16":
            import onnx

            data = onnx_export._to_fp16(onnx.load_from_string(data)).SerializeToString()
        return data

    def _ort(self, module: nn.Module, shape):
        import numpy as np

        from .export.onnx import OnnxRuntimeModel

        device = "cpu" if self.spec.backend == "ort-cpu" else "cuda"
        runner = OnnxRuntimeModel(self._onnx_bytes(module, shape), device, self.spec.threads, quiet=True)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).to(device)
        return lambda: runner(x)  # on CUDA, device-resident input and output through IOBinding

    def _trt(self, module: nn.Module, shape):
        from .export import tensorrt

        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory()
        stamp = f"{time.time_ns()}"
        onnx_path = Path(self._tmp.name) / f"{stamp}.onnx"
        onnx_path.write_bytes(self._onnx_bytes(module, shape, dynamic=True))  # TensorRT profiles need a batch axis
        engine = tensorrt.build_engine(onnx_path, Path(self._tmp.name) / f"{stamp}.engine",
                                       precision=self.spec.precision, min_batch=shape[0], opt_batch=shape[0],
                                       max_batch=shape[0])
        runner = tensorrt.TensorRTModel(engine)
        x = torch.randn(shape, device="cuda")
        return lambda: runner(x)

    def time_ms(self, call, flush: bool = False) -> float:
        """Fastest of ``table_iters`` timed calls after two warm-up calls, in ms: on a shared machine,
        interference only ever adds time, so the minimum is the layer's own cost (the whole-model checks
        use the same statistic)."""
        from .bench.harness import time_calls

        stats["points"] += 1
        with _torch_threads(self.spec):
            if not flush:
                times = time_calls(call, self.device, warmup=2, min_iters=self.spec.table_iters, min_seconds=0.0,
                                   max_iters=self.spec.table_iters)
            else:  # each call starts with cold caches, as a layer does inside a model that overflows them
                buf = _flush_buffer()
                call(), call()
                times = []
                for _ in range(self.spec.table_iters):
                    buf.sum()
                    t = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - t) * 1000.0)
        return min(times)

    def compare(self, calls: dict) -> dict:
        """Interleaved timing of whole models (the first is the reference): median ms per model and each
        other model's latency as a fraction of the reference's (median of per-round ratios).

        As ``bench.harness.interleave`` (bursts of each model take turns, the order alternating), but each
        burst starts with one untimed call and is summarised by its fastest call: ONNX Runtime's pool threads
        keep spinning a moment after a run, so the first call after another session's burst shares the cores
        with them (at 2 cores a burst's mean swung the ratios by 2x), and other processes only add time.
        ``ms`` is each model's median over all timed calls, ``min_ms`` its fastest.
        """
        stats["models"] += 1
        names = list(calls)
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)

        def once(n):
            t = time.perf_counter()
            calls[n]()
            sync()
            return (time.perf_counter() - t) * 1000.0

        with _torch_threads(self.spec):
            first = {n: [once(n) for _ in range(3)][-1] for n in names}  # warm up, and size the bursts
            burst = {n: int(min(50, max(3, round(20.0 / max(first[n], 1e-3))))) for n in names}
            rounds_ms: dict[str, list[float]] = {n: [] for n in names}
            times: dict[str, list[float]] = {n: [] for n in names}
            started, r = time.perf_counter(), 0
            while r < 6 or (time.perf_counter() - started < self.spec.check_seconds and r < 10_000):
                for n in (names if r % 2 == 0 else names[::-1]):
                    once(n)  # untimed: the previous session's threads settle
                    got = [once(n) for _ in range(burst[n])]
                    times[n] += got
                    rounds_ms[n].append(min(got))
                r += 1
        ref = names[0]
        fraction = {n: statistics.median([b / a for a, b in zip(rounds_ms[ref], rounds_ms[n])]) for n in names[1:]}
        return {"ms": {n: statistics.median(t) for n, t in times.items()},
                "min_ms": {n: min(t) for n, t in times.items()},
                "fraction": fraction, "rounds": r}


def last_level_cache_bytes() -> int:
    """The CPU's largest cache (L3 usually), from sysfs; 32 MiB when it cannot be read."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


_FLUSH = None


def _flush_buffer():
    """Twice the last-level cache: reading it all evicts whatever a timed call left there."""
    global _FLUSH
    import numpy as np

    if _FLUSH is None:
        _FLUSH = np.ones(2 * last_level_cache_bytes() // 8)
    return _FLUSH


def cold_layers(graph, spec: LatencySpec, device: torch.device) -> bool:
    """Whether layers are timed with cold caches: on a CPU, when the model's weights do not fit in half
    the last-level cache (then inside the whole model each layer finds its weights evicted by the others'; a
    layer timed alone, hot, ran up to 2x faster than its share of VGG-16 at batch 1 on ORT CPU)."""
    if device.type != "cpu":
        return False
    weight_bytes = sum(p.numel() for p in graph.model.parameters()) * (2 if spec.precision == "fp16" else 4)
    return weight_bytes > last_level_cache_bytes() // 2


class _torch_threads:
    def __init__(self, spec):
        self.n = spec.threads if spec.backend in ("eager", "compile") else None

    def __enter__(self):
        if self.n:
            self.saved = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.n:
            torch.set_num_threads(self.saved)


def model_call(runner: Runner, model: nn.Module, example: torch.Tensor):
    return runner.callable(model, tuple(example.shape))


# ----------------------------------------------------------------------------------------------- the table


@dataclass
class LatencyTable:
    """Per layer: ``in`` and ``out`` channel grids and ``ms[i][j]`` at (in[i], out[j])."""

    key: dict
    layers: dict[str, dict]
    path: str | None = None
    measured: bool = False  # measured in this process (False: read from the cache)
    seconds: float = 0.0

    def lookup(self, layer: str, cin: float, cout: float) -> float:
        entry = self.layers[layer]
        xs, ys, ms = entry["in"], entry["out"], entry["ms"]
        i0, i1, a = _bracket(xs, cin)
        j0, j1, b = _bracket(ys, cout)
        top = ms[i0][j0] * (1 - b) + ms[i0][j1] * b
        bottom = ms[i1][j0] * (1 - b) + ms[i1][j1] * b
        return top * (1 - a) + bottom * a


def _bracket(grid: list[int], v: float) -> tuple[int, int, float]:
    if v <= grid[0] or len(grid) == 1:
        return 0, 0, 0.0
    if v >= grid[-1]:
        n = len(grid) - 1
        return n, n, 0.0
    for k in range(len(grid) - 1):
        if grid[k] <= v <= grid[k + 1]:
            return k, k + 1, (v - grid[k]) / (grid[k + 1] - grid[k])
    return 0, 0, 0.0


def table_key(specs: list[LayerSpec], grids: dict, spec: LatencySpec, device: torch.device,
              cold: bool = False) -> tuple[dict, dict]:
    """(what is measured, where and with what): the first names the cache file, both must match to reuse it."""
    what = {"version": TABLE_VERSION, "backend": spec.backend, "batch": spec.batch, "precision": spec.precision,
            "threads": spec.threads, "iters": spec.table_iters, "cold_caches": cold,
            "layers": [s.shape_key() for s in specs], "grids": grids}
    where = {"device": device_label(device), "versions": library_versions(spec.backend)}
    return what, where


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            def show(v):
                return json.dumps(v)[:60]
            out.append(f"{prefix}{k}: {show(a)} -> {show(b)}")
    return out


def load_or_measure(specs: list[LayerSpec], grids: dict[str, list[int]], full: dict[str, int], spec: LatencySpec,
                    device: torch.device, runner: Runner | None = None, cold: bool = False) -> LatencyTable:
    """The table for these layers on this backend: from the cache when its key matches, else measured
    (and written to the cache). ``cold``: each timed call starts with flushed caches."""
    what, where = table_key(specs, grids, spec, device, cold)
    key = {"what": what, "where": where}
    folder = cache_dir(spec.cache_dir)
    path = folder / f"{spec.backend}-b{spec.batch}-{spec.precision}-{_digest(what)}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            stored = saved.get("key")
        except (OSError, ValueError) as exc:
            saved, stored = None, None
            _log(spec, f"cached table {path} is unreadable ({exc}); measuring again")
        if stored == key:
            _log(spec, f"table from cache {path}")
            return LatencyTable(key, saved["layers"], str(path), measured=False)
        if stored is not None:
            changes = "; ".join(_diff(stored, key)[:6]) or "format"
            _log(spec, f"cached table {path} was measured for another setting ({changes}); measuring again")
    else:
        _log(spec, f"no cached table for this model/backend/batch/precision in {folder}; measuring")
    runner = runner or Runner(spec, device)
    t0 = time.perf_counter()
    layers = {}
    for s in specs:
        ins = [0] if s.depthwise else _axis(s.in_groups, s.in_full, grids, full)
        outs = _axis(s.out_groups, s.out_full, grids, full)
        ms = []
        for cin in ins:
            row = []
            for cout in outs:
                module, shape = build_layer(s, cin or cout, cout)
                row.append(runner.time_ms(runner.callable(module, shape), flush=cold))
            ms.append(row)
        if s.depthwise:
            ins = [max(outs)]
        layers[s.name] = {"in": ins, "out": outs, "ms": ms, "depthwise": s.depthwise}
        _log(spec, f"  {s.name}: {len(ins)}x{len(outs)} points, {ms[-1][-1]:.4f} ms at full width")
    table = LatencyTable(key, layers, str(path), measured=True, seconds=time.perf_counter() - t0)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        from .files import write_json

        write_json(path, {"key": key, "layers": layers, "seconds": table.seconds,
                          "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        _log(spec, f"table measured in {table.seconds:.1f}s, cached at {path}")
    except OSError as exc:
        _log(spec, f"table measured in {table.seconds:.1f}s; could not cache it at {path} ({exc})")
    return table


# ----------------------------------------------------------------------------------------------- the model


def fit_layer_weights(xs: list[list[float]], ys: list[float]) -> dict:
    """Weights ``a`` with ``y ~ sum_l a_l x_l`` (through the origin: the dense point): ``alpha``, one shared
    weight by least squares; then per-layer weights by ridge regression towards ``alpha``, the ridge
    strength chosen by leave-one-out error among a scale-aware grid and infinity (= ``alpha`` for all).
    An ``alpha`` outside [0.2, 5] is timing noise, not the backend: 1 is used. Weights stay in [0, 5 alpha]."""
    import numpy as np

    X, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    n = X.shape[1] if X.ndim == 2 else 0

    def shared(Xs, ys_):
        s = Xs.sum(1)
        den = float(s @ s)
        a = float(s @ ys_) / den if den > 0 else 1.0
        return a if 0.2 <= a <= 5.0 else 1.0

    def ridge(Xs, ys_, lam):
        a = shared(Xs, ys_)
        if lam is None or n == 0:
            return np.full(n, a), a
        r = ys_ - Xs @ np.full(n, a)
        d = np.linalg.solve(Xs.T @ Xs + lam * np.eye(n), Xs.T @ r)
        return np.clip(a + d, 0.0, 5.0 * a), a

    if len(y) == 0 or n == 0:
        return {"alpha": 1.0, "weights": [1.0] * n, "ridge": None, "loo": {}}
    scale = float(np.trace(X.T @ X)) / n or 1.0
    grid = [None] + [c * scale for c in (1e-3, 1e-2, 1e-1, 1.0, 10.0)]
    loo = {}
    for lam in grid:
        if len(y) < 3:
            break
        err = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            w, _ = ridge(X[keep], y[keep], lam)
            err.append(abs(float(X[i] @ w) - y[i]))
        loo["inf" if lam is None else f"{lam / scale:g}"] = float(np.mean(err))
    best = min(loo, key=loo.get) if loo else "inf"
    lam = None if best == "inf" else float(best) * scale
    weights, alpha = ridge(X, y, lam)
    return {"alpha": alpha, "weights": [float(v) for v in weights], "ridge": best, "loo": loo}


class LatencyModel:
    """Predicted latency of the traced model at any group widths, and whole-model measurements."""

    def __init__(self, graph, spec: LatencySpec, round_to: int = 8, max_ratio: float = 0.95,
                 device: torch.device | None = None, table: LatencyTable | None = None, measure: bool = True):
        self.graph, self.spec = graph, spec
        self.device = check_backend(spec.backend, device)
        self.full = graph.widths()
        self.names = graph.names()
        self.round_to, self.max_ratio = round_to, max_ratio
        step = spec.step or round_to
        self.grids = {g.name: group_grid(g, g.width, step, round_to, max_ratio) for g in graph.groups}
        self.layers = layer_specs(graph, spec.batch)
        self.runner = Runner(spec, self.device)
        self.cold = cold_layers(graph, spec, self.device)
        self.table = table or load_or_measure(self.layers, self.grids, self.full, spec, self.device, self.runner,
                                              self.cold)
        self.alpha, self.beta = 1.0, 0.0
        self.weights = {s.name: 1.0 for s in self.layers}  # a_l: each layer's weight in the model
        self.dense_ms = self.sum_ms(self.full)
        self.dense_model = copy.deepcopy(graph.model).cpu().eval()
        self.example = graph.example_inputs[:1].detach().cpu()
        self.report: dict = {"backend": spec.backend, "batch": spec.batch, "precision": spec.precision,
                             "device": device_label(self.device), "table": self.table.path,
                             "table_from_cache": not self.table.measured, "table_seconds": self.table.seconds,
                             "cold_caches": self.cold,
                             "grid": self.grids, "tolerance": TOLERANCE}
        self.solves: list[dict] = []
        if measure:
            self.fit()

    # --- prediction
    def sum_ms(self, widths: dict[str, int]) -> float:
        total = 0.0
        for s in self.layers:
            cin, cout = layer_widths(s, widths, self.full)
            total += self.table.lookup(s.name, cin, cout)
        return total

    def layer_ms(self, widths: dict[str, int]) -> dict[str, float]:
        """Each layer's table latency at ``widths``."""
        return {s.name: self.table.lookup(s.name, *layer_widths(s, widths, self.full)) for s in self.layers}

    def predict_ms(self, widths: dict[str, int]) -> float:
        return sum(self.weights[n] * ms for n, ms in self.layer_ms(widths).items()) + self.beta

    def fraction(self, widths: dict[str, int]) -> float:
        return self.predict_ms(widths) / self.predict_ms(self.full)

    # --- whole-model measurements
    def _pruned(self, widths: dict[str, int]) -> nn.Module:
        from .plan import PruningPlan
        from .surgery import pruned_copy

        if all(widths[g] == self.full[g] for g in self.full):
            return copy.deepcopy(self.dense_model)
        model = self.graph.model
        plan = PruningPlan.first_channels(widths, self.graph)
        return pruned_copy(model, plan, self.graph.example_inputs).cpu().eval()

    def measure(self, configs: dict[str, dict[str, int] | nn.Module]) -> dict:
        """Whole models timed interleaved with the dense one: ms and fraction of dense, per name."""
        calls = {"dense": self.runner.callable(self.dense_model, tuple(self.example.shape))}
        for name, c in configs.items():
            model = c if isinstance(c, nn.Module) else self._pruned(c)
            calls[name] = self.runner.callable(model.cpu().eval(), tuple(self.example.shape))
        return self.runner.compare(calls)

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
            _log(self.spec, f"dense {dense:.4f} ms on {self.spec.backend} at batch {self.spec.batch}; layers sum to "
                            f"{s_dense:.4f} ms; alpha {fit['alpha']:.3f}, per-layer ridge {fit['ridge']}; model error "
                            f"on {err['configs']} random widths: mean {err['mean']:.1%}, max {err['max']:.1%} "
                            f"(shared weight: mean {errors['shared_weight']['mean']:.1%}; plain sum+constant: mean "
                            f"{errors['sum_plus_constant']['mean']:.1%})")

    # --- the solver's pieces
    def choices(self, allowed: dict[str, list[int]]) -> dict[str, list[int]]:
        """Each group's widths on the measured grid, less those no faster than a wider one."""
        out = {}
        for g, widths in allowed.items():
            on_grid = [w for w in widths if w in self.grids.get(g, ())] or list(widths)
            kept, best = [], math.inf
            for w in sorted(on_grid, reverse=True):
                ms = self.predict_ms({**self.full, g: w})
                if ms < best or w == self.full[g]:
                    kept.append(w)
                    best = min(best, ms)
            out[g] = sorted(kept)
        return out

    def check(self, widths: dict[str, int]) -> dict:
        measured = self.measure({"pruned": widths})
        return {"fraction": measured["fraction"]["pruned"], "ms": measured["ms"]["pruned"],
                "dense_ms": measured["ms"]["dense"]}


# ----------------------------------------------------------------------------------------------- the solver


_ACTIVE: LatencyModel | None = None


def activate(model: LatencyModel | None) -> None:
    """Make ``model`` the one a ``latency`` budget and ``CostModel`` use for its graph."""
    global _ACTIVE
    _ACTIVE = model


def active_for(graph) -> LatencyModel | None:
    """The active latency model when it prices this graph's groups (same names, within its widths)."""
    m = _ACTIVE
    if m is None:
        return None
    widths = graph.widths()
    if set(widths) != set(m.full) or any(widths[g] > m.full[g] for g in widths):
        return None
    return m


def model_for(graph, budget, round_to: int, max_ratio: float) -> LatencyModel:
    found = active_for(graph)
    if found is not None:
        return found
    spec = getattr(budget, "latency", None)
    if spec is None:
        raise BudgetError("a latency budget needs its backend and batch: "
                          "Budget('latency', F, latency=LatencySpec(...)), "
                          "or compressor.latency.prepare(...) before planning")
    model = LatencyModel(graph, spec, round_to, max_ratio)
    activate(model)
    return model


def solve(lat: LatencyModel, budget, search, choices) -> tuple[dict[str, int], dict]:
    """Solve, measure the pruned model whole, correct the target by the miss and solve again."""
    target, best, steps = budget.fraction, None, []
    for i in range(CORRECTIONS):
        widths = search(target)
        predicted = lat.fraction(widths)
        real = lat.check(widths)
        miss = real["fraction"] - budget.fraction
        step = {"iteration": i + 1, "solver_target": target, "predicted": predicted, "measured": real["fraction"],
                "measured_ms": real["ms"], "dense_ms": real["dense_ms"], "widths": widths}
        steps.append(step)
        _log(lat.spec, f"solve {i + 1}: aim at {target:.3f} of dense, predicted {predicted:.3f}, measured "
                       f"{real['fraction']:.3f} ({real['ms']:.4f} ms vs dense {real['dense_ms']:.4f} ms), target "
                       f"{budget.fraction:.3f}")
        if best is None or abs(miss) < abs(best["measured"] - budget.fraction):
            best = step
        # accepted at once only near the middle of the tolerance: a plan measured at its edge lands outside
        # it in the next timing as often as not (VGG-16 at batch 1 on one core: 0.328 for 0.3, then 0.343)
        if abs(miss) <= AIM * budget.tolerance:
            break
        if i + 1 < CORRECTIONS:
            # the backend runs these widths k = measured / predicted times the model's guess: aim at F / k,
            # k averaged over the solves so far (a noisy timing does not swing the next aim alone)
            ks = [s["measured"] / s["predicted"] for s in steps if s["predicted"] > 0]
            k = statistics.fmean(ks) if ks else 1.0
            aim = min(1.0, max(1e-3, budget.fraction / k))
            if abs(aim - target) < 1e-4 and step["widths"] == search(aim):
                break  # the correction would give the same widths again
            target = aim
            _log(lat.spec, f"missed by {miss:+.3f} (tolerance {budget.tolerance:.3f}); measured/predicted = {k:.3f}, "
                           f"aiming at {target:.3f} of the model's prediction instead")
    met = abs(best["measured"] - budget.fraction) <= budget.tolerance
    if not met:
        _log(lat.spec, f"warning: best plan measured {best['measured']:.3f} of dense, outside {budget.fraction:.3f} "
                       f"+/- {budget.tolerance:.3f} after {len(steps)} solves (noisy timing or a coarse grid)")
    report = {"target": budget.fraction, "tolerance": budget.tolerance, "met": met, "solves": steps,
              "chosen": steps.index(best) + 1, "choices": choices}
    lat.solves.append(report)
    return best["widths"], report


# ----------------------------------------------------------------------------------------------- the run


def budget_from(metric: str, value: float, backend: str = "ort-cpu", batch: int = 1, cache: str | None = None,
                step: int | None = None):
    """The run's Budget: metric ``latency`` (value: fraction of dense latency) or ``latency_ms`` (value:
    milliseconds, resolved to a fraction once the dense model is measured); others as before."""
    from .budget import Budget

    if metric not in ("latency", "latency_ms"):
        return Budget(metric, value)
    from .checks import number

    if metric == "latency":
        number("--budget-latency", value, low=0, high=1, low_open=True)
    else:
        number("--budget-ms", value, low=0, low_open=True)
    spec = LatencySpec(backend, batch, cache_dir=cache, step=step, target_ms=value if metric == "latency_ms" else None)
    check_backend(backend)
    return Budget("latency", value if metric == "latency" else 1.0, latency=spec)


def check_config(config) -> None:
    """RunConfig.validate's part for budgets (latency ones included)."""
    budget_from(config.budget_metric, config.budget, getattr(config, "latency_backend", "ort-cpu"),
                getattr(config, "latency_batch", 1), getattr(config, "latency_cache", None),
                getattr(config, "latency_step", None))


def prepare(budget, graph, device: torch.device | None = None, round_to: int = 8, max_ratio: float = 0.95):
    """Measure (or load) the table and the dense latency, make the model the active one, and resolve an
    absolute target in ms to a fraction. Returns the budget the criteria get."""
    if budget.metric != "latency":
        activate(None)
        return budget
    model = LatencyModel(graph, budget.latency, round_to, max_ratio, device)
    activate(model)
    fraction = budget.fraction
    if budget.latency.target_ms is not None:
        fraction = budget.latency.target_ms / model.dense_ms
        if fraction > 1.0:
            raise BudgetError(f"--budget-ms {budget.latency.target_ms:g} is above the dense model's own latency "
                              f"({model.dense_ms:.4f} ms on {budget.latency.backend} at batch {budget.latency.batch}): "
                              "nothing to prune")
        _log(budget.latency, f"{budget.latency.target_ms:g} ms is {fraction:.3f} of the dense {model.dense_ms:.4f} ms")
    from .budget import Budget

    return Budget("latency", fraction, latency=budget.latency)


def run_metrics(budget, pruned_model: nn.Module, dense_cost, pruned_cost) -> dict:
    """``{"latency": ...}`` for metrics.json (empty for other budgets): target, predicted, measured and dense
    latency, the MAC ratio beside the latency ratio, the model's error and the solver's steps."""
    if budget.metric != "latency" or _ACTIVE is None:
        return {}
    lat = _ACTIVE
    measured = lat.measure({"pruned": copy.deepcopy(pruned_model).cpu().eval()})
    widths = _widths_of(lat, pruned_model)
    predicted = lat.fraction(widths) if widths else None
    fraction = measured["fraction"]["pruned"]
    spec = budget.latency
    out = {"target": {"fraction": budget.fraction, "ms": budget.fraction * lat.dense_ms,
                      "given_ms": spec.target_ms if spec else None},
           "dense_ms": measured["ms"]["dense"], "measured_ms": measured["ms"]["pruned"], "measured_fraction": fraction,
           "predicted_fraction": predicted, "predicted_ms": predicted * lat.dense_ms if predicted else None,
           "within_tolerance": abs(fraction - budget.fraction) <= budget.tolerance,
           "mac_fraction": pruned_cost.macs / dense_cost.macs,
           "params_fraction": pruned_cost.params / dense_cost.params,
           "speedup": 1.0 / fraction if fraction else None, "model": lat.report,
           "solver": lat.solves[-1] if lat.solves else None}
    _log(lat.spec, f"pruned model: {fraction:.3f} of dense latency measured ({measured['ms']['pruned']:.4f} ms), "
                   f"target {budget.fraction:.3f}, MACs {out['mac_fraction']:.3f}")
    return {"latency": out}


def _widths_of(lat: LatencyModel, pruned: nn.Module) -> dict[str, int] | None:
    try:
        return {g: (pruned.get_submodule(g).out_channels if isinstance(pruned.get_submodule(g), nn.Conv2d)
                    else pruned.get_submodule(g).out_features) for g in lat.full}
    except AttributeError:
        return None


__all__ = ["LatencySpec", "LatencyModel", "LatencyTable", "BACKENDS", "TOLERANCE", "cache_dir", "check_backend",
           "prepare", "budget_from", "run_metrics", "activate", "active_for"]
