#!/usr/bin/env python
"""int8 on a CPU, measured: dense fp32 ONNX vs pruned fp32 ONNX vs pruned int8 ONNX (ONNX Runtime).

Goal (issue 16): the pruned int8 ONNX runs at least 2x faster than fp32 ONNX at batch 32 on
a CPU, with at most 0.5 points of top-1 accuracy lost. Both comparisons are reported: int8
against the pruned fp32 ONNX (what quantization adds) and against the dense fp32 ONNX (the
whole gain), with accuracy on the full test split.

Given a run directory (dense.pt and pruned.pt) this script
  1. exports dense.pt to fp32 ONNX, and pruned.pt to fp32 ONNX and int8 ONNX (ONNX Runtime
     static quantization, QDQ, per-channel weights, calibrated on training images), through
     ``compress export``'s own code, so each is verified against PyTorch and scored on the
     whole test split;
  2. times the three on ONNX Runtime's CPU provider at each batch size in ONE interleaved run
     (short bursts of each model take turns round after round, the order alternating), and
     reports each model's median latency and the median of the per-round latency ratios;
  3. prints each result as it lands and writes BASE.json and BASE.md with the command, the
     commit, the device, the data set and the date.

Usage:
  python benchmarks/cpu_int8.py RUN_DIR [--data-dir DATA_DIR] [--batch-sizes 1,32] [--threads N]
      [--calibration-images 512] [--calibration-method minmax] [--out benchmarks/results/cpu-int8-NAME]
e.g. (CIFAR-10):
  compress run --model vgg16 --dataset cifar10 --data-dir data --budget-macs 0.5 --out runs/vgg16
  python benchmarks/cpu_int8.py runs/vgg16 --data-dir data
A smoke run (seconds, meaningless numbers):
  compress run --model conv4 --dataset synthetic --epochs 2 --finetune-epochs 1 --out /tmp/int8run
  python benchmarks/cpu_int8.py /tmp/int8run --min-seconds 0.5 --out /tmp/int8run/cpu-int8
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("dense-fp32", "pruned-fp32", "pruned-int8")
GOAL_SPEEDUP, GOAL_BATCH, GOAL_DROP_POINTS = 2.0, 32, 0.5


def interleaved(calls: dict, rounds: int, min_iters: int, min_seconds: float, warmup: int) -> dict:
    """Per-model ms of each burst, round after round: compressor.bench's helper where it exists."""
    try:
        from compressor.bench.harness import interleave
    except ImportError:
        interleave = None
    if interleave is not None:
        timed = interleave(calls, torch.device("cpu"), warmup=warmup, rounds=rounds, min_iters=min_iters,
                           min_seconds=min_seconds)
        return {"round_ms": timed["round_ms"], "times": timed["times"], "rounds": timed["rounds"]}
    names = list(calls)  # the same loop, for a checkout without compressor.bench.harness.interleave
    for n in names:
        for _ in range(warmup):
            calls[n]()
    burst = max(1, -(-min_iters // rounds))
    round_ms = {n: [] for n in names}
    times = {n: [] for n in names}
    started, r = time.perf_counter(), 0
    while r < rounds or time.perf_counter() - started < min_seconds:
        for n in (names if r % 2 == 0 else names[::-1]):
            ms = []
            for _ in range(burst):
                t = time.perf_counter()
                calls[n]()
                ms.append((time.perf_counter() - t) * 1000.0)
            times[n] += ms
            round_ms[n].append(statistics.fmean(ms))
        r += 1
    return {"round_ms": round_ms, "times": times, "rounds": r}


def ratio(round_ms: dict, slow: str, fast: str) -> float:
    """Median over rounds of slow's ms / fast's ms: the speedup of ``fast`` over ``slow``."""
    return statistics.median(a / b for a, b in zip(round_ms[slow], round_ms[fast]) if b > 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished run directory with dense.pt and pruned.pt")
    p.add_argument("--data-dir", help="where the run's data set lives (default ./data)")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default 0: its own choice)")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--calibration-method", default="minmax", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--rounds", type=int, default=20, help="at least this many interleaved rounds per batch size")
    p.add_argument("--min-iters", type=int, default=100, help="at least this many timed calls per model")
    p.add_argument("--min-seconds", type=float, default=10.0, help="time each batch size for at least this long")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", help="BASE of BASE.json and BASE.md (default benchmarks/results/cpu-int8-RUN_NAME)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    from compressor import checkpoint
    from compressor import data as datasets
    from compressor.data import DeviceBatches
    from compressor.export import onnx
    from compressor.export.run import export
    from compressor.files import write_json, write_text
    from compressor.provenance import device_name, git_commit

    run_dir = args.run_dir
    for name in ("dense.pt", "pruned.pt"):
        if not (run_dir / name).is_file():
            p.error(f"{run_dir} has no {name}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    base = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"cpu-int8-{run_dir.resolve().name}"
    artifacts = run_dir / "int8-bench"
    _, spec = checkpoint.load(run_dir / "pruned.pt", with_spec=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "goal": f"pruned int8 ONNX >= {GOAL_SPEEDUP:g}x faster than fp32 ONNX at batch {GOAL_BATCH} on a CPU, "
                f"losing <= {GOAL_DROP_POINTS} points of top-1 accuracy",
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "commit": git_commit() or "unknown", "date": started.isoformat(timespec="seconds"),
        "device": device_name(torch.device("cpu")), "machine": platform.processor() or platform.machine(),
        "dataset": spec.dataset, "model": spec.model, "run_dir": str(run_dir),
        "onnxruntime": __import__("onnxruntime").__version__, "threads": args.threads or "onnxruntime default",
        "calibration": {"images": args.calibration_images, "method": args.calibration_method},
    }
    print(f"{result['model']} on {result['dataset']}, {result['device']}, commit {result['commit']}")

    # 1. export, verify, and score on the whole test split (compress export's code)
    dense = export(run_dir / "dense.pt", "onnx", out=artifacts / "dense", data_dir=args.data_dir)
    pruned = export(run_dir / "pruned.pt", "onnx,onnx-int8", out=artifacts / "pruned", data_dir=args.data_dir,
                    calibration_images=args.calibration_images, calibration_method=args.calibration_method)
    entries = {"dense-fp32": dense["onnx"], "pruned-fp32": pruned["onnx"], "pruned-int8": pruned["onnx-int8"]}
    result["test_images"] = pruned["accuracy"]["images"]
    result["pytorch_accuracy"] = {"dense": dense["accuracy"]["pytorch"], "pruned": pruned["accuracy"]["pytorch"]}
    result["models"] = {n: {"path": e["path"], "accuracy": e["accuracy"],
                            "top1_agreement_with_pytorch": e["verification"]["top1_agreement"],
                            "size_bytes": Path(e["path"]).stat().st_size} for n, e in entries.items()}
    drop = 100 * (entries["pruned-fp32"]["accuracy"] - entries["pruned-int8"]["accuracy"])
    drop_dense = 100 * (entries["dense-fp32"]["accuracy"] - entries["pruned-int8"]["accuracy"])
    result["int8_accuracy_drop_points"] = {"vs_pruned_fp32": drop, "vs_dense_fp32": drop_dense}
    for n, e in result["models"].items():
        print(f"accuracy  {n:12s} {e['accuracy']:.2%} on {result['test_images']} test images", flush=True)
    print(f"int8 accuracy change: {-drop:+.2f} points vs pruned fp32, {-drop_dense:+.2f} vs dense fp32", flush=True)

    # 2. latency: the three take turns in one interleaved run per batch size
    runners = {n: onnx.OnnxRuntimeModel(e["path"], "cpu", threads=args.threads or None) for n, e in entries.items()}
    data = datasets.load(spec.dataset, args.data_dir, val_fraction=0.0)
    result["latency"] = {}
    for batch in batch_sizes:
        x = next(iter(DeviceBatches(data, "test", batch, "cpu")))[0]
        if x.shape[0] < batch:
            x = x.repeat((batch + x.shape[0] - 1) // x.shape[0], 1, 1, 1)[:batch]
        calls = {n: (lambda r=r: r(x)) for n, r in runners.items()}
        timed = interleaved(calls, args.rounds, args.min_iters, args.min_seconds, args.warmup)
        point = {"rounds": timed["rounds"],
                 "median_ms": {n: statistics.median(timed["times"][n]) for n in MODELS},
                 "speedup": {"pruned-fp32 over dense-fp32": ratio(timed["round_ms"], "dense-fp32", "pruned-fp32"),
                             "pruned-int8 over pruned-fp32": ratio(timed["round_ms"], "pruned-fp32", "pruned-int8"),
                             "pruned-int8 over dense-fp32": ratio(timed["round_ms"], "dense-fp32", "pruned-int8")}}
        result["latency"][str(batch)] = point
        ms = ", ".join(f"{n} {v:.3f} ms" for n, v in point["median_ms"].items())
        ups = ", ".join(f"{k} {v:.2f}x" for k, v in point["speedup"].items())
        print(f"batch {batch:4d}: {ms}; {ups} ({timed['rounds']} rounds)", flush=True)

    # 3. the goal, and the record
    at_goal = result["latency"].get(str(GOAL_BATCH))
    if at_goal:
        result["goal_met"] = {
            "speedup_vs_pruned_fp32": at_goal["speedup"]["pruned-int8 over pruned-fp32"] >= GOAL_SPEEDUP,
            "speedup_vs_dense_fp32": at_goal["speedup"]["pruned-int8 over dense-fp32"] >= GOAL_SPEEDUP,
            "accuracy_vs_pruned_fp32": drop <= GOAL_DROP_POINTS,
        }
    base.parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(f"{base}.json"), result)  # atomic: a killed run leaves no half-written result
    write_text(Path(f"{base}.md"), markdown(result))
    print(f"wrote {base}.json and {base}.md")
    return 0


def markdown(r: dict) -> str:
    lines = [f"# int8 on a CPU: {r['model']} on {r['dataset']}", "",
             f"- goal: {r['goal']}", f"- command: `{r['command']}`", f"- commit: `{r['commit']}`",
             f"- date: {r['date']}", f"- device: {r['device']} ({r['machine']}), ONNX Runtime {r['onnxruntime']}, "
             f"threads: {r['threads']}",
             f"- int8: ONNX Runtime static quantization, QDQ, per-channel int8 weights, {r['calibration']['method']} "
             f"calibration on {r['calibration']['images']} training images", "",
             f"| model | test accuracy ({r['test_images']} images) | agreement with PyTorch | file size |",
             "|---|---|---|---|"]
    for n, m in r["models"].items():
        lines.append(f"| {n} | {m['accuracy']:.2%} | {m['top1_agreement_with_pytorch']:.2%} | "
                     f"{m['size_bytes'] / 1024:.0f} KiB |")
    d = r["int8_accuracy_drop_points"]
    lines += ["", f"int8 accuracy change: {-d['vs_pruned_fp32']:+.2f} points vs pruned fp32, "
              f"{-d['vs_dense_fp32']:+.2f} vs dense fp32.", "",
              "| batch | dense fp32 ms | pruned fp32 ms | pruned int8 ms | pruned/dense | int8/pruned fp32 | "
              "int8/dense | rounds |", "|---|---|---|---|---|---|---|---|"]
    for batch, p in r["latency"].items():
        ms, s = p["median_ms"], list(p["speedup"].values())
        lines.append(f"| {batch} | {ms['dense-fp32']:.3f} | {ms['pruned-fp32']:.3f} | {ms['pruned-int8']:.3f} | "
                     f"{s[0]:.2f}x | {s[1]:.2f}x | {s[2]:.2f}x | {p['rounds']} |")
    lines += ["", "Latency: median ms per call; speedups: median of per-round ratios of one interleaved run "
              "(the three models take turns, alternating order)."]
    if "goal_met" in r:
        lines += ["", "Goal at batch 32: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}"
                                                       for k, v in r["goal_met"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
