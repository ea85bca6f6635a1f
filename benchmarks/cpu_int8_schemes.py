#!/usr/bin/env python
"""int8 schemes on this CPU: accuracy and speed of each ``--int8-scheme`` beside the pruned fp32 ONNX.

ONNX Runtime's x86 kernels for signed int8 weights can saturate on CPUs without VNNI, so an
int8 file's answers depend on the CPU that serves it (compressor.export.quantize). This script
  1. exports a run's pruned.pt to fp32 ONNX and to int8 ONNX in every scheme, through
     ``compress export``'s own code (each verified against PyTorch, scored on the whole test
     split, with its self-test recorded), unless ``--reuse`` finds them;
  2. times fp32 and every int8 file on ONNX Runtime's CPU provider in ONE interleaved run per
     batch size (compressor.bench.harness.interleave: median of bursts, rounds alternating);
  3. with ``--serve-only``, skips both and instead loads every int8 file as a service would
     (``compressor.runtime.load``, which re-runs its self-test) and scores it on the test split:
     run this under an emulated CPU without VNNI to see what an AVX2 server would answer,
        qemu-x86_64 -cpu EPYC-Rome $(which python) benchmarks/cpu_int8_schemes.py RUN --serve-only ...
  4. prints each result as it lands and writes BASE.json and BASE.md with command, commit,
     device (CPU features as CPUID reports them), data set and date.

Usage:
  python benchmarks/cpu_int8_schemes.py RUN_DIR --data-dir DATA [--batch-sizes 1,32] [--out BASE]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor import checkpoint, runtime, selftest  # noqa: E402
from compressor import data as datasets  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
from compressor.export.quantize import SCHEMES  # noqa: E402
from compressor.export.run import export, split_accuracy  # noqa: E402
from compressor.files import write_json, write_text  # noqa: E402
from compressor.provenance import git_commit  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data-dir")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its own choice)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--min-seconds", type=float, default=10.0, help="per batch size")
    p.add_argument("--serve-only", action="store_true", help="load each int8 file as a service would, and score it")
    p.add_argument("--reuse", action="store_true", help="reuse artifacts an earlier run of this script exported")
    p.add_argument("--out", required=True, help="BASE of BASE.json and BASE.md")
    p.add_argument("--artifacts", default="/tmp/cpu-int8-schemes", help="where the exported files go (not the repo)")
    args = p.parse_args()
    header = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "commit": git_commit(),
              "device": selftest.cpu_features(), "torch": torch.__version__, "threads": args.threads,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    folder = Path(args.artifacts)
    _, spec = checkpoint.load(args.run_dir / "pruned.pt", with_spec=True)
    header["data"] = spec.dataset
    if args.serve_only:
        return serve(args, header, folder, spec)
    results = {}
    for scheme in SCHEMES:
        out = folder / scheme
        saved = out / "export.json"
        if args.reuse and saved.is_file():
            results[scheme] = json.loads(saved.read_text())
        else:
            try:
                results[scheme] = export(args.run_dir / "pruned.pt", "onnx,onnx-int8", out=out,
                                         data_dir=args.data_dir, int8_scheme=scheme)
            except CompressorError as exc:  # the export's own verification refused it: that is a result
                results[scheme] = {"refused": str(exc)}
        r = results[scheme]
        line = r.get("refused") or (f"int8 accuracy {r['onnx-int8']['accuracy']:.2%} (fp32 ONNX "
                                    f"{r['onnx']['accuracy']:.2%}, PyTorch {r['accuracy']['pytorch']:.2%}); "
                                    f"verification {r['onnx-int8']['verification']}")
        print(f"{scheme}: {line}", flush=True)
    from compressor.bench.harness import interleave
    from compressor.export.onnx import OnnxRuntimeModel

    files = {"fp32": folder / "u8u8" / Path(results["u8u8"]["onnx"]["path"]).name}
    files |= {s: Path(r["onnx-int8"]["path"]) for s, r in results.items() if "onnx-int8" in r}
    calls = {n: OnnxRuntimeModel(f, "cpu", args.threads or None) for n, f in files.items()}
    timing = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        x = torch.randn(batch, *spec.input_shape)
        timed = interleave({n: (lambda m=m: m(x)) for n, m in calls.items()}, torch.device("cpu"), warmup=10,
                           rounds=args.rounds, min_iters=50, min_seconds=args.min_seconds)
        timing[batch] = {n: float(torch.tensor(timed["round_ms"][n]).median()) for n in calls}  # median burst
        print(f"batch {batch}: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in timing[batch].items()), flush=True)
    report = {**header, "results": results, "median_ms": timing}
    write_json(args.out + ".json", report)
    rows = ["| scheme | test accuracy | vs fp32 ONNX (points) | top-1 agreement (256 imgs) | max rel. diff | "
            + " | ".join(f"ms @ batch {b}" for b in timing) + " |", "|---" * (5 + len(timing)) + "|"]
    for name in files:
        r = results.get(name, results["u8u8"])
        art = r["onnx"] if name == "fp32" else r["onnx-int8"]
        drop = 100 * (art["accuracy"] - results["u8u8"]["onnx"]["accuracy"])
        rows.append(f"| {name} | {art['accuracy']:.2%} | {drop:+.2f} | {art['verification']['top1_agreement']:.2%} | "
                    f"{art['verification'].get('max_relative_diff', float('nan')):.1%} | "
                    + " | ".join(f"{timing[b][name]:.3f}" for b in timing) + " |")
    rows += [f"| {s} | refused by the export: {r['refused'][:200]} |" for s, r in results.items() if "refused" in r]
    write_text(args.out + ".md", _head(header) + "\n".join(rows) + "\n")


def serve(args, header: dict, folder: Path, spec) -> None:
    data = datasets.load(spec.dataset, args.data_dir, val_fraction=0.0)
    served = {}
    for scheme in SCHEMES:
        path = next((folder / scheme).glob("*-int8.onnx"), None)
        if path is None:
            continue
        try:
            model = runtime.load(path)
            served[scheme] = {"self_test": model.self_test}
        except CompressorError as exc:  # what it would have answered, served anyway
            model, served[scheme] = runtime.load(path, self_test=False), {"refused": str(exc)}
        served[scheme]["accuracy"] = split_accuracy(model, data)
        print(f"{scheme}: {served[scheme]}", flush=True)
    write_json(args.out + ".json", {**header, "served": served})
    rows = ["| scheme | runtime.load (self-test) | test accuracy if served anyway |", "|---|---|---|"]
    for s, r in served.items():
        verdict = ("refused: " + r["refused"].split(" so it is refused: ")[-1].split(". This CPU")[0]
                   if "refused" in r else f"loaded (top-1 {r['self_test']['top1_agreement']:.0%}, logits within "
                   f"{r['self_test']['max_relative_diff']:.1%})")
        rows.append(f"| {s} | {verdict} | {r['accuracy']:.2%} |")
    write_text(args.out + ".md", _head(header) + "\n".join(rows) + "\n")


def _head(h: dict) -> str:
    return (f"# int8 schemes ({h['data']})\n\n- command: `{h['command']}`\n- commit: {h['commit']}\n"
            f"- device: {h['device']}\n- torch {h['torch']}\n- date: {h['date']}\n\n")


if __name__ == "__main__":
    main()
