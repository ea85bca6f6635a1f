"""What a latency budget measures, and where: one vocabulary with the bench.

A latency backend is a registered bench backend (:data:`compressor.bench.backends.BACKENDS`:
``ort``, ``eager``, ``compile``, ``trt``, ...), a device and a precision. ``ort-cpu`` and
``ort-cuda`` spell the backend and its device in one word (the CLI's ``--latency-backend``);
a plain name runs where its registry entry says (``gpu_only``: the GPU; ``ort``: the CPU;
the rest: the run's device, else the GPU where there is one). So a backend added to the
bench is a latency backend too, with no change here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CompressorError

PRECISIONS = ("fp32", "fp16", "int8")  # int8: ONNX Runtime only (QDQ layers and models)
ENV_CACHE = "COMPRESSOR_LATENCY_CACHE"


def backend_names() -> list[str]:
    """What ``--latency-backend`` takes: every bench backend, and ``ort-cpu`` / ``ort-cuda``."""
    from ..bench.backends import BACKENDS

    names = BACKENDS.names()
    return [*(f"ort-{d}" for d in ("cpu", "cuda") if "ort" in names), *names]


def split(backend: str) -> tuple[str, str | None]:
    """``"ort-cuda"`` -> ("ort", "cuda"); a plain bench backend -> (name, None: its default device)."""
    from ..bench.backends import BACKENDS

    if backend in BACKENDS:
        return backend, None
    name, _, device = backend.rpartition("-")
    if name in BACKENDS and device in ("cpu", "cuda"):
        return name, device
    raise CompressorError(f"--latency-backend must be one of {', '.join(backend_names())}, not {backend!r}")


@dataclass(frozen=True)
class LatencySpec:
    """Where and how latency is measured, and what the target is (a fraction of dense, or ``target_ms``)."""

    backend: str = "ort-cpu"
    batch: int = 1
    precision: str = "fp32"
    cache_dir: str | None = None
    step: int | None = None  # grid step in channels (default: the solver's round_to)
    target_ms: float | None = None  # --budget-ms; None for a fraction of the dense latency
    fraction: float | None = None  # --budget-latency: the share of the dense latency to keep
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default) / torch threads for eager
    table_iters: int = 10  # timed calls per table point (their median), after 2 warm-up calls
    check_seconds: float = 1.0  # whole-model checks: interleaved timing per comparison
    validate: int = 3  # random width configurations the model's error is measured on
    calibrate: int | None = None  # whole-model measurements the weights are fitted on (None: 2 per layer, 8 to 40)
    verbose: bool = True

    def __post_init__(self):
        from ..checks import number

        split(self.backend)
        if self.precision not in PRECISIONS:
            raise CompressorError(f"latency precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        number("--latency-batch", self.batch, integer=True, low=1)
        number("--latency-step", self.step, integer=True, low=1, optional=True)
        number("--budget-ms", self.target_ms, low=0, low_open=True, optional=True)
        number("--budget-latency", self.fraction, low=0, high=1, low_open=True, optional=True)
        number("latency threads", self.threads, integer=True, low=1, optional=True)
        number("latency table_iters", self.table_iters, integer=True, low=1)
        number("latency check_seconds", self.check_seconds, low=0)
        number("latency validate", self.validate, integer=True, low=0)
        number("latency calibrate", self.calibrate, integer=True, low=1, optional=True)

    @property
    def bench_backend(self) -> str:
        return split(self.backend)[0]

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"latency: {message}", flush=True)


def resolve_device(spec: LatencySpec, device: torch.device | None = None) -> torch.device:
    """The device ``spec``'s backend runs on here, or one clear error saying why it cannot run."""
    from ..bench.backends import BACKENDS, applies, backends_for

    name, where = split(spec.backend)
    info = BACKENDS.get(name).info
    cuda = torch.cuda.is_available()
    if not applies(name, spec.precision):
        raise CompressorError(f"--latency-precision {spec.precision} is measured on "
                              f"{', '.join(backends_for(spec.precision))} only, not {spec.backend}")
    if info.get("tensorrt"):
        from ..export import tensorrt

        if not tensorrt.available():
            raise CompressorError(f"--latency-backend {spec.backend} needs TensorRT (pip install tensorrt) and a "
                                  "CUDA GPU")
    if where is None:
        where = ("cuda" if info.get("gpu_only") else "cpu" if name == "ort"
                 else (torch.device(device).type if device is not None else "cuda" if cuda else "cpu"))
    if where == "cuda" and not cuda:
        raise CompressorError(f"--latency-backend {spec.backend} needs a CUDA GPU; this machine has none "
                              "(use ort-cpu or eager here)")
    if where == "cpu" and info.get("gpu_only"):
        raise CompressorError(f"--latency-backend {spec.backend} runs only on a CUDA GPU ({info['gpu_only']})")
    if name == "ort":
        try:
            import onnxruntime as ort
        except ImportError:
            raise CompressorError(f"--latency-backend {spec.backend} needs onnxruntime: pip install onnxruntime"
                                  ) from None
        if where == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise CompressorError(f"--latency-backend {spec.backend} needs onnxruntime-gpu; this machine's "
                                  f"onnxruntime has {', '.join(ort.get_available_providers())} (use ort-cpu here)")
    if name in ("compile", "aoti") and where == "cpu":
        import shutil

        if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
            raise CompressorError(f"--latency-backend {name} on a CPU needs a C++ compiler (torch's inductor)")
    if spec.precision == "fp16" and where == "cpu":
        raise CompressorError("--latency-precision fp16 is for GPUs; on a CPU measure fp32 or int8")
    if where == "cuda" and device is not None and torch.device(device).type == "cuda":
        return torch.device(device)
    return torch.device(where)


def cache_dir(given: str | None = None) -> Path:
    """--latency-cache, else $COMPRESSOR_LATENCY_CACHE, else $XDG_CACHE_HOME/compressor/latency."""
    if given:
        return Path(given).expanduser()
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "compressor" / "latency"
