#!/usr/bin/env python
"""How long a latency table takes at the defaults, and how right the model built on it is (issue 28).

For each model and batch size: the latency model is built exactly as ``compress run --budget-latency``
builds it at its defaults (no ``--latency-step``: a coarse grid refined where a layer's latency
steps, points from the per-layer cache when there) on ``--backend`` (default ort-cpu) at
``--precision``, then its error is measured on ``--validate`` random width configurations (timed
whole, interleaved with the dense model, not used for fitting). Each row is printed and written
to BASE.json / BASE.md as it lands; a row already in BASE.json is skipped (re-run to continue), and
no row starts after ``--budget-seconds``. Random weights: latency does not depend on them.

Usage:
  python benchmarks/latency_tables.py [--models vgg16,resnet20] [--batch-sizes 1,32] [--backend ort-cpu]
      [--precision fp32] [--validate 10] [--cache DIR] [--budget-seconds S]
      [--out benchmarks/results/cpu-latency-tables]
The GPU rows: benchmarks/gpu_latency.sh.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor import latency, models, surgery  # noqa: E402
from compressor.files import write_json, write_text  # noqa: E402
from compressor.provenance import device_name, git_commit, versions  # noqa: E402
from compressor.selftest import cpu_features  # noqa: E402

SHAPES = {"conv4": (1, 28, 28)}  # the rest: CIFAR's 3 x 32 x 32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vgg16,resnet20")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--backend", default="ort-cpu", help="a latency backend (compress run --latency-backend)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", help="for eager/compile (default: the GPU when there is one)")
    ap.add_argument("--budget-seconds", type=float, help="start no row after this long (default: no limit)")
    ap.add_argument("--input-size", type=int, help="square input side (default: 28 for conv4, else 32); "
                    "e.g. 224 with --models torchvision.models:resnet18")
    ap.add_argument("--validate", type=int, default=10, help="random width configurations the error is measured on")
    ap.add_argument("--cache", help="latency cache folder (default: a fresh temporary one: tables timed from scratch)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-latency-tables"))
    args = ap.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="latency-tables-")
    started = time.perf_counter()
    device = torch.device(args.device) if args.device else None
    where = latency.resolve_device(latency.LatencySpec(args.backend, 1, args.precision), device)
    result = {"command": shlex.join([sys.executable, *sys.argv]), "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_name(where), "cpu_features": cpu_features(), "versions": versions(),
              "backend": args.backend, "precision": args.precision,
              "cache": cache if args.cache else "fresh temporary folder", "rows": []}
    previous = Path(f"{args.out}.json")
    if previous.is_file():  # rows already measured with this setting are kept, not measured again
        old = json.loads(previous.read_text())
        if (old.get("backend"), old.get("precision")) == (args.backend, args.precision):
            result["rows"] = old.get("rows", [])
            result["first_command"] = old.get("first_command", old.get("command"))
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        shape = SHAPES.get(name, (3, 32, 32))
        if args.input_size:
            shape = (shape[0], args.input_size, args.input_size)
        torch.manual_seed(0)
        model = models.create(name, 10, shape[0]).eval()
        graph = surgery.trace(model, torch.randn(2, *shape))
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            if any((r["model"], r["batch"], r.get("input", list(shape))) == (name, batch, list(shape))
                   for r in result["rows"]):
                print(f"{name} batch {batch}: measured earlier, kept", flush=True)
                continue
            if args.budget_seconds is not None and time.perf_counter() - started > args.budget_seconds:
                print(f"--budget-seconds spent: {name} batch {batch} left for the next run", flush=True)
                continue
            spec = latency.LatencySpec(args.backend, batch, args.precision, cache_dir=cache, validate=args.validate)
            t0 = time.perf_counter()
            lat = latency.LatencyModel(graph, spec, round_to=8, max_ratio=0.95, device=device)
            total = time.perf_counter() - t0
            err = lat.report["model_error"]
            row = {"model": name, "batch": batch, "input": list(shape), "table_seconds": lat.table.seconds,
                   "points": lat.table.points,
                   "grid_sizes": {g: len(w) for g, w in lat.grids.items()}, "fit_seconds": lat.report["fit_seconds"],
                   "total_seconds": total, "dense_ms": lat.dense_ms, "model_error": err,
                   "calibration_configs": lat.report["calibration_configs"]}
            result["rows"].append(row)
            print(f"{name} batch {batch}: table {lat.table.seconds:.0f}s ({lat.table.points['measured']} points "
                  f"timed, {lat.table.points['cached']} cached), fit {lat.report['fit_seconds']:.0f}s, total "
                  f"{total:.0f}s; dense {lat.dense_ms:.3f} ms; model error on {err['calibrated']['configs']} random "
                  f"widths: mean {err['calibrated']['mean']:.1%}, max {err['calibrated']['max']:.1%}", flush=True)
            write_json(Path(f"{args.out}.json"), result)
    lines = [f"# Latency tables at the defaults ({args.backend}, {args.precision})", "",
             f"Command: `{result['command']}`  ", f"Commit: {result['commit']}; date {result['date']}  ",
             *([f"First rows by: `{result['first_command']}`  "] if result.get("first_command") else []),
             f"Device: {result['device']}; CPU (int8 features): {result['cpu_features']}  ",
             f"Cache: {result['cache']}", "",
             "| model | input | batch | table s | points timed / cached | fit s | total s | dense ms | error mean "
             "| error max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        e = r["model_error"]["calibrated"]
        size = "x".join(map(str, r.get("input", [])[1:]))
        lines.append(f"| {r['model']} | {size} | {r['batch']} | {r['table_seconds']:.0f} | {r['points']['measured']} / "
                     f"{r['points']['cached']} | {r['fit_seconds']:.0f} | {r['total_seconds']:.0f} | "
                     f"{r['dense_ms']:.3f} | {e['mean']:.1%} | {e['max']:.1%} |")
    write_text(Path(f"{args.out}.md"), "\n".join(lines) + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")
    if not args.cache:
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
