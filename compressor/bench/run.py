"""``compress bench RUN_DIR``: time the run's dense and pruned models on each backend."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import checkpoint, surgery
from ..checks import number
from ..errors import CompressorError
from ..files import write_json, write_text
from ..pipeline import device_name, versions
from ..train import pick_device
from . import backends as B
from . import report
from .harness import measure

MODELS = ("dense", "pruned")


def parse_batch_sizes(text: str | list[int] | None) -> list[int]:
    """Batch sizes from "1,32" (or a list of whole numbers), each at least 1."""
    if text is not None and not isinstance(text, str):  # the API may pass a list
        sizes = list(text) if isinstance(text, (list, tuple)) else [text]
        for b in sizes:
            number("--batch-sizes", b, integer=True, low=1)
        if not sizes:
            raise CompressorError("--batch-sizes needs at least one batch size")
        return sizes
    try:
        sizes = [int(b) for b in (text or "1,32").split(",") if b.strip()]
    except ValueError:
        raise CompressorError(f"--batch-sizes takes whole numbers separated by commas, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise CompressorError(f"--batch-sizes must be positive, got {text!r}")
    return sizes


def check_options(batch_sizes: str | list[int] | None = None, warmup: int = 10, min_iters: int = 30,
                  min_seconds: float = 1.0) -> list[int]:
    """Refuse a bad benchmark number (NaN and inf too) with one clear error; returns the batch sizes.

    ``compress run --bench`` calls this before training, ``bench`` before loading anything.
    """
    number("--warmup", warmup, integer=True, low=0)
    number("--min-iters", min_iters, integer=True, low=1)
    number("--min-seconds", min_seconds, low=0)
    return parse_batch_sizes(batch_sizes)


def bench(run_dir: str | Path, backends: str | None = None, batch_sizes: str | list[int] | None = None,
          precision: str = "fp32", device: str = "auto", warmup: int = 10, min_iters: int = 30,
          min_seconds: float = 1.0, argv: list[str] | None = None) -> dict:
    sizes = check_options(batch_sizes, warmup, min_iters, min_seconds)
    run_dir = Path(run_dir)
    for name in MODELS:
        if not (run_dir / f"{name}.pt").is_file():
            raise CompressorError(f"{run_dir} is not a finished run directory: {name}.pt is missing")
    dev = pick_device(device)
    B.check_precision(precision, dev)
    names = B.parse_backends(backends, dev)
    loaded = {name: checkpoint.load(run_dir / f"{name}.pt", with_spec=True) for name in MODELS}
    spec = loaded["dense"][1]
    example = spec.example_inputs()
    costs = {name: surgery.count(model, example) for name, (model, _) in loaded.items()}
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}

    rows = []
    for backend in names:
        for name, (model, _) in loaded.items():
            started = time.perf_counter()
            prepared = B.prepare(backend, model, example, dev, precision, run_dir / "bench-artifacts", name, max(sizes))
            build_s = time.perf_counter() - started
            for batch in sizes:
                x = torch.randn(batch, *spec.input_shape, device=dev, dtype=prepared.input_dtype)
                if dev.type == "cuda" and backend in ("eager", "compile"):
                    x = x.contiguous(memory_format=torch.channels_last)
                stats = measure(prepared.fn, x, dev, warmup=warmup, min_iters=min_iters, min_seconds=min_seconds)
                rows.append({"backend": backend, "model": name, "batch": batch, "precision": precision,
                             "cuda_graphs": prepared.cuda_graphs, "note": prepared.note,
                             "build_seconds": build_s, **stats,
                             "macs": costs[name].macs, "params": costs[name].params})
                print(f"{backend:8s} {name:6s} batch {batch:5d}: median {stats['compute']['median_ms']:.3f} ms, "
                      f"p99 {stats['compute']['p99_ms']:.3f} ms, {stats['compute']['throughput']:.0f} img/s")
    result = {
        "command": argv,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(dev),
        "versions": versions(),
        "run_dir": str(run_dir),
        "model": spec.model,
        "dataset": spec.dataset,
        "precision": precision,
        "timing": {"warmup": warmup, "min_iters": min_iters, "min_seconds": min_seconds,
                   "clock": "CUDA events" if dev.type == "cuda" else "perf_counter"},
        "accuracy": metrics.get("accuracy"),
        "macs": {n: c.macs for n, c in costs.items()},
        "params": {n: c.params for n, c in costs.items()},
        "mac_speedup": costs["dense"].macs / costs["pruned"].macs,
        "rows": rows,
        "speedups": report.speedups(rows),
    }
    write_json(run_dir / "bench.json", result)
    write_text(run_dir / "bench.md", report.markdown(result))
    report.plots(result, run_dir)
    print(report.markdown(result))
    return result
