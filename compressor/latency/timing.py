"""Timing for the latency model: modules become callables through the bench's registered backends
(:func:`compressor.bench.backends.prepare`), and are timed by the bench's harness, with its
statistic: the median (of a point's calls; of the per-round ratios when models are compared
interleaved). What the table measures is what ``compress bench`` runs.

One exception: on a CPU, when the model's weights overflow half the last-level cache, each table
point is timed with cold caches (every call starts after reading a buffer twice the cache's
size), since inside such a model each layer finds its weights evicted by the others' (timed
hot, VGG-16's layers summed to 5.4 ms against 9.1 ms for the whole model at batch 1 on one
core; timed cold, 8.9 ms). The harness times calls back to back, so that loop is here.

ONNX Runtime sessions are built with spinning off: the latency model's calibration holds up to
44 sessions at once, and each one's pool threads, spinning after its run, took the cores from the
next: VGG-16 at batch 1 measured 7.0 ms instead of 3.4 ms, and the same 20 pruned copies timed
twice differed by 62% on average (3.5% with spinning off; 2 cores).
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

from ..bench import backends, harness
from .spec import LatencySpec

stats = {"points": 0, "models": 0}  # timings taken in this process (tests read them)


class Timer:
    """Turns a module into a callable on the spec's backend, device and precision, and times it."""

    def __init__(self, spec: LatencySpec, device: torch.device, keep: bool = False):
        self.spec, self.device, self.keep = spec, device, keep  # keep: leave the built files (tests read them)
        self._tmp = tempfile.TemporaryDirectory(prefix="compressor-latency-")
        self.workdir = Path(self._tmp.name)
        self._built = 0

    def callable(self, module: nn.Module, shape: tuple[int, ...]):
        """A no-argument callable that runs ``module`` on a fixed random batch of ``spec.batch`` inputs."""
        name = self.spec.bench_backend
        shape = (self.spec.batch, *shape[1:])
        example = torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(0))
        self._built += 1
        label = f"m{self._built}"
        with _quiet_warnings():  # int8: a QDQ ONNX (bench.backends.quantize_int8), as `--export onnx-int8` deploys
            prepared = backends.prepare(name, module, example, self.device, self.spec.precision, self.workdir, label,
                                        max_batch=self.spec.batch, threads=self.spec.threads, spinning=False)
        for path in self.workdir.glob(f"{label}*"):  # loaded: the runtime holds it (a table has hundreds of points)
            if path.is_file() and not self.keep:
                path.unlink()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(self.device, prepared.input_dtype)
        if self.device.type == "cuda" and x.dim() == 4 and backends.BACKENDS.get(name).info.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        fn = prepared.fn

        def call():
            with torch.inference_mode():
                return fn(x)

        return call

    def release(self) -> None:
        """Free what the backend cached for the modules timed so far (torch.compile's graphs: without it, a
        table's hundreds of shapes would pass dynamo's recompile limit and run uncompiled)."""
        backends.release(self.spec.bench_backend)

    def time_ms(self, call, flush: bool = False) -> float:
        """Median of ``table_iters`` timed calls after two warm-up calls, in ms; ``flush``: cold caches."""
        stats["points"] += 1
        with self.threads():
            if not flush:
                times = harness.time_calls(call, self.device, warmup=2, min_iters=self.spec.table_iters,
                                           min_seconds=0.0, max_iters=self.spec.table_iters)
            else:
                buf = _flush_buffer()
                call(), call()
                times = []
                for _ in range(self.spec.table_iters):
                    buf.sum()
                    t = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - t) * 1000.0)
        return statistics.median(times)

    def compare(self, calls: dict) -> dict:
        """Whole models timed interleaved (:func:`compressor.bench.harness.interleave`), the first the
        reference: ``ms`` (median per model) and ``fraction`` (each other model's latency over the
        reference's: the inverse of the harness's speedup, the median of the per-round ratios)."""
        stats["models"] += 1
        with self.threads():
            timed = harness.interleave(calls, self.device, warmup=2, rounds=6, min_iters=18,
                                       min_seconds=self.spec.check_seconds, settle=1)
        self.release()
        fraction = {n: 1.0 / s if s else None for n, s in timed["speedup"].items()}
        return {"ms": {n: statistics.median(t) for n, t in timed["times"].items()},
                "min_ms": {n: min(t) for n, t in timed["times"].items()}, "fraction": fraction,
                "rounds": timed["rounds"]}

    @contextlib.contextmanager
    def threads(self):
        """``spec.threads`` torch threads while timing a PyTorch backend (ONNX Runtime's are its session's)."""
        n = self.spec.threads if self.spec.bench_backend != "ort" else None
        saved = torch.get_num_threads()
        if n:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if n:
                torch.set_num_threads(saved)


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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


@lru_cache(maxsize=1)
def _flush_buffer():
    """Twice the last-level cache: reading it all evicts whatever a timed call left there."""
    import numpy as np

    return np.ones(2 * last_level_cache_bytes() // 8)


def cold_layers(model: nn.Module, spec: LatencySpec, device: torch.device) -> bool:
    """Whether layers are timed with cold caches: on a CPU, when the model's weights do not fit in half
    the last-level cache (a layer timed alone, hot, ran up to 2x faster than its share of VGG-16 at
    batch 1 on ORT CPU)."""
    if device.type != "cpu":
        return False
    weight_bytes = sum(p.numel() for p in model.parameters()) * {"fp16": 2, "int8": 1}.get(spec.precision, 4)
    return weight_bytes > last_level_cache_bytes() // 2
