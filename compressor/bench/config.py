"""The benchmark settings, declared once: the CLI's "benchmark" options and what
:func:`compressor.bench.run.bench` takes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import number
from ..errors import CompressorError
from ..options import Settings, option
from . import backends as B

DEFAULT_BATCH_SIZES = (1, 32)
_ANY_DEVICE = torch.device("cuda")  # where every precision is possible: names are checked without the real device


def _backends_help() -> str:
    return f"{','.join(B.BACKENDS.names())} (default {','.join(B.default_backends())})"


@dataclass(frozen=True)
class BenchConfig(Settings):
    """What ``compress bench`` times, and for how long; checked when built.

    The texts of the CLI are normalised here: ``batch_sizes`` ("1,32" or a list) becomes a tuple of
    whole numbers, ``precision`` ("fp32,int8" or a list) a tuple of known names, ``backends`` ("eager,ort",
    default: the registry's defaults) a tuple of names. Whether a backend and a precision can run on
    the device is :meth:`resolve`'s question.
    """

    backends: tuple | None = option(None, _backends_help, flag="--backends")
    batch_sizes: tuple | None = option(None, "comma-separated batch sizes (default 1,32)", flag="--batch-sizes")
    precision: tuple = option("fp32", "comma-separated: fp32, fp16 (GPU), int8 (ort only; other backends skip it) "
                              "(default fp32)", flag="--precision")
    warmup: int = option(10, None, flag="--warmup", integer=True, low=0)
    min_iters: int = option(30, "timed calls per model and point, at least", flag="--min-iters", integer=True, low=1)
    min_seconds: float = option(1.0, "time each point for at least this long", flag="--min-seconds", low=0)
    rounds: int = option(10, "dense and pruned alternate in at least this many rounds of short bursts; the speedup "
                         "is the median of the per-round ratios (default 10)", flag="--rounds", integer=True, low=1,
                         parse_check=True)
    compile_mode: str = option("default", "torch.compile mode (default: default, quick to compile; reduce-overhead "
                               "and max-autotune capture CUDA graphs on a GPU, max-autotune also tunes kernels for "
                               "minutes)", flag="--compile-mode", choices=B.COMPILE_MODES)
    point_seconds: float = option(60.0, "cap on each build and each point; one past it is recorded as timed out "
                                  "(default 60)", flag="--point-seconds", low=0, low_open=True, parse_check=True)
    total_seconds: float | None = option(None, "stop starting points after this long; --resume does the rest "
                                         "(default: no limit)", flag="--total-seconds", low=0, low_open=True,
                                         optional=True, parse_check=True)

    def check(self) -> None:
        object.__setattr__(self, "batch_sizes", parse_batch_sizes(self.batch_sizes))
        object.__setattr__(self, "precision", tuple(B.check_precision(self.precision, _ANY_DEVICE)))
        if isinstance(self.backends, (list, tuple)):  # the API's list, or settings built before
            names = [str(b).strip() for b in self.backends]
        else:
            names = [b.strip() for b in (self.backends or ",".join(B.default_backends())).split(",") if b.strip()]
        object.__setattr__(self, "backends", tuple(names))

    def resolve(self, device: torch.device) -> tuple[list[str], list[str]]:
        """(backends, precisions) to run on ``device``: each known and possible there (fp16 needs a GPU,
        trt TensorRT), and each precision run by one of the backends; else one clear error."""
        precisions = B.check_precision(list(self.precision), device)
        return B.parse_backends(",".join(self.backends), device, precisions), precisions


def parse_batch_sizes(text: str | list[int] | tuple | None) -> tuple[int, ...]:
    """Batch sizes from "1,32" (or a list of whole numbers), each at least 1; ``None``: 1,32."""
    if text is not None and not isinstance(text, str):  # the API may pass a list
        sizes = list(text) if isinstance(text, (list, tuple)) else [text]
        for b in sizes:
            number("--batch-sizes", b, integer=True, low=1)
        if not sizes:
            raise CompressorError("--batch-sizes needs at least one batch size")
        return tuple(sizes)
    try:
        sizes = [int(b) for b in (text or ",".join(map(str, DEFAULT_BATCH_SIZES))).split(",") if b.strip()]
    except ValueError:
        raise CompressorError(f"--batch-sizes takes whole numbers separated by commas, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise CompressorError(f"--batch-sizes must be positive, got {text!r}")
    return tuple(sizes)
