"""Timing: warm up, then time each call (CUDA events on a GPU, perf_counter on a CPU)
until both a minimum count and a minimum duration are reached, and summarise.

Following trtexec, latency is reported twice on a GPU: the compute alone (input already
on the device, output left there) and with the host-to-device copy of the input and the
device-to-host copy of the output included.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _percentile(sorted_ms: list[float], q: float) -> float:
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = (len(sorted_ms) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def summarize(times_ms: list[float], batch: int) -> dict:
    s = sorted(times_ms)
    median = statistics.median(s)
    return {"mean_ms": statistics.fmean(s), "median_ms": median, "p90_ms": _percentile(s, 0.90),
            "p99_ms": _percentile(s, 0.99), "min_ms": s[0], "iterations": len(s),
            "throughput": batch / (median / 1000.0)}


def time_calls(call: Callable[[], object], device: torch.device, warmup: int = 10, min_iters: int = 30,
               min_seconds: float = 1.0, max_iters: int = 10_000) -> list[float]:
    """Milliseconds per call of ``call``, after ``warmup`` calls."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        while len(pairs) < max_iters and (len(pairs) < min_iters or time.perf_counter() - started < min_seconds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            pairs.append((start, end))
            if len(pairs) % 100 == 0:
                torch.cuda.synchronize(device)  # keep the wall clock honest for min_seconds
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in pairs]
    else:
        while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - started < min_seconds):
            t = time.perf_counter()
            call()
            times.append((time.perf_counter() - t) * 1000.0)
    return times


def measure(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device, **kwargs) -> dict:
    """Latency of ``fn(x)`` for a device-resident batch ``x``; on a GPU also with host transfers included."""
    batch = x.shape[0]
    with torch.inference_mode():
        result = {"compute": summarize(time_calls(lambda: fn(x), device, **kwargs), batch)}
        if device.type == "cuda":
            host_in = x.cpu().pin_memory()
            out = fn(x)
            host_out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)

            def with_transfers():
                y = fn(host_in.to(device, non_blocking=True))
                host_out.copy_(y, non_blocking=True)

            result["with_transfers"] = summarize(time_calls(with_transfers, device, **kwargs), batch)
    return result
