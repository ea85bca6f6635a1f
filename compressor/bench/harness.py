"""Timing: warm up, then time each call (CUDA events on a GPU, perf_counter on a CPU)
until both a minimum count and a minimum duration are reached, and summarise.

Following trtexec, latency is reported twice on a GPU: the compute alone (input already
on the device, output left there) and with the host-to-device copy of the input and the
device-to-host copy of the output included.

Dense against pruned is timed *interleaved* (:func:`interleave`): short timed bursts of
each model alternate round after round (dense, pruned, then pruned, dense, ...), and the
speedup is the median of the per-round ratios, so that a clock or a GPU whose speed drifts
(thermal throttling, boost clocks, a neighbour's load) moves both sides of every ratio alike.
The clock is a function argument, so a test can drive it.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _cuts(values: list[float], n: int) -> list[float]:
    """The ``n - 1`` cut points that split ``values`` into ``n`` equal groups, interpolating linearly
    between order statistics (``statistics.quantiles``, inclusive: numpy's default percentile)."""
    if len(values) == 1:  # Python < 3.13 wants two
        return [values[0]] * (n - 1)
    return statistics.quantiles(values, n=n, method="inclusive")


def summarize(times_ms: list[float], batch: int) -> dict:
    s = sorted(times_ms)
    median = statistics.median(s)
    percentiles = _cuts(s, 100)  # percentiles[k - 1] is the k-th
    return {"mean_ms": statistics.fmean(s), "median_ms": median, "p90_ms": percentiles[89],
            "p99_ms": percentiles[98], "min_ms": s[0], "iterations": len(s),
            "throughput": batch / (median / 1000.0)}


def time_calls(call: Callable[[], object], device: torch.device, warmup: int = 10, min_iters: int = 30,
               min_seconds: float = 1.0, max_iters: int = 10_000,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Milliseconds per call of ``call``, after ``warmup`` calls, back to back (one model at a time).

    On a CPU the calls are timed with ``clock`` (seconds); on a GPU with CUDA events.
    """
    for _ in range(warmup):
        call()
    times: list[float] = []
    started = clock()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        while len(pairs) < max_iters and (len(pairs) < min_iters or clock() - started < min_seconds):
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
        while len(times) < max_iters and (len(times) < min_iters or clock() - started < min_seconds):
            t = clock()
            call()
            times.append((clock() - t) * 1000.0)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(calls: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 10, rounds: int = 10,
               min_iters: int = 30, min_seconds: float = 1.0, max_seconds: float | None = None,
               max_rounds: int = 100_000, clock: Callable[[], float] = time.perf_counter,
               settle: int = 0) -> dict:
    """Time two (or more) calls in alternating rounds; the first one is the reference.

    ``settle``: untimed calls at the start of each burst. With many ONNX Runtime sessions on a CPU
    (the latency model's calibration times up to 44 at once), the previous session's pool threads
    keep spinning a moment after its burst and share the cores with the next one's first calls.

    Each model's first call is timed alone (``first_call_ms``: where torch.compile compiles
    for this shape), then ``warmup`` calls each. Then rounds: in each, every model runs one
    burst of ``ceil(min_iters / rounds)`` calls, in alternating order (A B, B A, A B, ...), so
    a linear drift within a round cancels too. Rounds go on until at least ``rounds`` rounds,
    ``min_iters`` calls per model and ``min_seconds`` of timing, or stop at ``max_seconds``
    after the first call (then ``timed_out`` is true and what was measured is kept).

    Returns ``times`` (every call's ms, per model), ``round_ms`` (each burst's mean ms per
    call), ``ratios`` (reference / other, per round, for each other model) and ``speedup``
    (the median ratio per other model), ``first_call_ms``, ``rounds`` and ``timed_out``.
    """
    names = list(calls)
    if len(names) < 2:
        raise ValueError("interleave needs at least two calls")
    burst = max(1, -(-min_iters // max(1, rounds)))
    point_started = clock()
    first_call_ms = {}
    for n in names:
        t = clock()
        calls[n]()
        _sync(device)
        first_call_ms[n] = (clock() - t) * 1000.0
    for n in names:
        for _ in range(warmup):
            calls[n]()
    _sync(device)
    round_ms: dict[str, list[float]] = {n: [] for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    pending: list[tuple[str, list]] = []  # CUDA events, read once synchronized
    started = clock()
    timed_out = False
    r = 0
    while True:
        if r >= max_rounds or (r >= rounds and r * burst >= min_iters and clock() - started >= min_seconds):
            break
        if max_seconds is not None and clock() - point_started >= max_seconds:
            timed_out = True
            break
        for n in (names if r % 2 == 0 else names[::-1]):
            for _ in range(settle):
                calls[n]()
            if device.type == "cuda":
                events = []
                for _ in range(burst):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    calls[n]()
                    end.record()
                    events.append((start, end))
                pending.append((n, events))
            else:
                burst_ms = []
                for _ in range(burst):
                    t = clock()
                    calls[n]()
                    burst_ms.append((clock() - t) * 1000.0)
                times[n] += burst_ms
                round_ms[n].append(statistics.fmean(burst_ms))
        r += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # each round ends on the GPU too: the wall clock checks above stay honest
    if pending:
        torch.cuda.synchronize(device)
        for n, events in pending:
            burst_ms = [s.elapsed_time(e) for s, e in events]
            times[n] += burst_ms
            round_ms[n].append(statistics.fmean(burst_ms))
    ref = names[0]
    ratios = {n: [a / b for a, b in zip(round_ms[ref], round_ms[n]) if b > 0] for n in names[1:]}
    return {"first_call_ms": first_call_ms, "warmup": warmup, "burst": burst, "rounds": r, "timed_out": timed_out,
            "times": times, "round_ms": round_ms, "ratios": ratios,
            "speedup": {n: statistics.median(v) if v else None for n, v in ratios.items()},
            "speedup_iqr": {n: _cuts(v, 4)[::2] if v else None for n, v in ratios.items()}}


def measure_pair(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, device: torch.device,
                 **kwargs) -> dict:
    """:func:`interleave` on ``fn(x)`` for each model: per model ``compute`` statistics (and on a GPU
    ``with_transfers``, a second interleaved pass that copies the input in and the output out)."""
    batch = x.shape[0]
    clock = kwargs.get("clock", time.perf_counter)
    started = clock()
    with torch.inference_mode():
        timed = interleave({n: (lambda f=f: f(x)) for n, f in fns.items()}, device, **kwargs)
        result = {"interleaved": timed,
                  "models": {n: {"compute": summarize(timed["times"][n], batch)} if timed["times"][n] else {}
                             for n in fns}}
        if device.type == "cuda" and not timed["timed_out"]:
            host_in = x.cpu().pin_memory()
            calls = {}
            for n, f in fns.items():
                out = f(x)
                host_out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                del out  # hold no output of a CUDA-graph replay while the other model runs

                def with_transfers(f=f, host_out=host_out):
                    host_out.copy_(f(host_in.to(device, non_blocking=True)), non_blocking=True)

                calls[n] = with_transfers
            kw = dict(kwargs, warmup=min(kwargs.get("warmup", 10), 3))
            if kwargs.get("max_seconds") is not None:  # both passes share the point's cap
                kw["max_seconds"] = max(0.0, kwargs["max_seconds"] - (clock() - started))
            transfers = interleave(calls, device, **kw)
            result["interleaved_with_transfers"] = {k: transfers[k] for k in ("rounds", "speedup", "timed_out")}
            for n in fns:
                if transfers["times"][n]:
                    result["models"][n]["with_transfers"] = summarize(transfers["times"][n], batch)
    return result
