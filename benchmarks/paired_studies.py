#!/usr/bin/env python
"""What one change buys, from two `compress compare` studies of the same dense model and seeds (e.g. with
and without --distill): per method and budget present in both, the accuracy difference B - A paired by seed,
with its 95% CI (t distribution), and each side's mean ± std.

Usage:
  python benchmarks/paired_studies.py STUDY_A/compare.json STUDY_B/compare.json --labels plain,distill \\
      --out benchmarks/results/cpu-cifar10-conv4-distill.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from compressor.compare import paired_difference
from compressor.provenance import git_commit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--labels", default="A,B")
    p.add_argument("--out")
    args = p.parse_args(argv)
    la, lb = args.labels.split(",")
    a, b = json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text())

    def accuracies(study):
        found = {}
        for c in study["cells"]:
            if c["status"] == "complete":
                found.setdefault((c["method"], c["metric"], c["fraction"]), {})[c["seed"]] = c["accuracy"]["finetuned"]
        return found

    acc_a, acc_b = accuracies(a), accuracies(b)
    lines = [f"# {lb} against {la}, paired by seed", "",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- {la}: {args.a} (command `{' '.join(a['command'] or [])}`, cells at commit(s) "
             f"{', '.join(sorted({str(c.get('commit')) for c in a['cells']}))})",
             f"- {lb}: {args.b} (command `{' '.join(b['command'] or [])}`, cells at commit(s) "
             f"{', '.join(sorted({str(c.get('commit')) for c in b['cells']}))})",
             f"- device: {b['device']}; model {b['model']}, data {b['dataset']}; summary commit {git_commit()}, "
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             "- accuracy: top-1 on the test split after fine-tuning (percent); Δ = "
             f"{lb} - {la} paired by seed, 95% CI from the t distribution", "",
             f"| method | budget | seeds | {la} | {lb} | Δ [95% CI] | verdict |", "|---|---|---|---|---|---|---|"]
    for key in sorted(set(acc_a) & set(acc_b)):
        method, metric, fraction = key
        seeds = sorted(set(acc_a[key]) & set(acc_b[key]))
        xa, xb = [acc_a[key][s] for s in seeds], [acc_b[key][s] for s in seeds]
        d = paired_difference({s: acc_b[key][s] for s in seeds}, {s: acc_a[key][s] for s in seeds})

        def ms(x):
            return f"{100 * statistics.mean(x):.2f} ± {100 * statistics.stdev(x):.2f}" if len(x) > 1 else "-"

        delta = "n < 2" if d is None else f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
        lines.append(f"| {method} | {metric}:{fraction:g} | {len(seeds)} | {ms(xa)} | {ms(xb)} | {delta} | "
                     f"{'' if d is None else d['verdict']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
