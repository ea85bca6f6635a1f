#!/usr/bin/env python
"""Does PSAP's protection matter? (issue 15) The same PSAP cells with protection at z = 2 (default), at
z = 0.5 (fires often) and off (z = 1e9), at equal epochs, from one dense model and the same seeds.

Each setting is a `compress compare` study of its own (methods: psap only) under OUT/z<value>, so every
cell is an ordinary run directory and a killed run continues where it stopped. Then, per budget and
setting: test accuracy mean ± std over seeds, the difference from "off" paired by seed with a 95% CI,
the restores per step, and the watched-gradient z distribution of the masked channels
(`criterion.psap.steps[*].masked_z`). Writes OUT/psap-protection.{json,md}.

Usage (about 2-3 minutes per cell on 2 CPU cores for Conv-4 / CIFAR-10):
  python benchmarks/psap_protection.py --checkpoint STUDY/dense/dense.pt --data-dir data \\
      --budgets params:0.05 --seeds 3 --pruning-epochs 5 --out studies/psap-protection
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from compressor.compare import compare, paired_difference, parse_budgets, parse_seeds
from compressor.criteria.psap import PSAPConfig
from compressor.files import write_json, write_text
from compressor.pipeline import RunConfig
from compressor.provenance import stamp
from compressor.rundir import RunDir
from compressor.train import pick_device

SETTINGS = {"z2": 2.0, "z0.5": 0.5, "off": 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the dense model (a compare study's dense/dense.pt)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir")
    p.add_argument("--model", default="conv4")
    p.add_argument("--budgets", default="params:0.05")
    p.add_argument("--seeds", default="3")
    p.add_argument("--pruning-epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--round-to", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    budgets, seeds, out = parse_budgets(args.budgets), parse_seeds(args.seeds), Path(args.out)
    base = RunConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir, checkpoint=args.checkpoint,
                     pruning_epochs=args.pruning_epochs, round_to=args.round_to)
    studies = {}
    for label, z in SETTINGS.items():
        print(f"== psap, protection {label} (protect_z {z:g})", flush=True)
        config = PSAPConfig(steps=args.steps, step_epochs=1, protect_z=z)
        studies[label] = compare(base, ["psap"], budgets, seeds, out / label, configs={"psap": config},
                                 argv=["python", *sys.argv])
    rows = []
    for metric, fraction in budgets:
        acc = {label: {c["seed"]: c["accuracy"]["finetuned"] for c in s["cells"]
                       if c["status"] == "complete" and (c["metric"], c["fraction"]) == (metric, fraction)}
               for label, s in studies.items()}
        for label, study in studies.items():
            cells = [c for c in study["cells"] if c["status"] == "complete" and
                     (c["metric"], c["fraction"]) == (metric, fraction)]
            psap = [RunDir(c["run"]).read_metrics()["criterion"]["psap"] for c in cells]
            zs = [s["masked_z"] for r in psap for s in r["steps"] if s.get("masked_z", {}).get("masked")]
            values = list(acc[label].values())
            rows.append({
                "budget": f"{metric}:{fraction:g}", "protection": label, "protect_z": SETTINGS[label],
                "seeds": sorted(acc[label]), "accuracy_mean": statistics.mean(values) if values else None,
                "accuracy_std": statistics.stdev(values) if len(values) > 1 else None,
                "vs_off": None if label == "off" else paired_difference(acc[label], acc["off"]),
                "restored_per_step": [r["restored_per_step"] for r in psap],
                "masked_z_p99": [z["p99"] for z in zs], "masked_z_max": [z["max"] for z in zs],
                "masked_above_2": [z["above"]["2.0"] for z in zs], "masked": [z["masked"] for z in zs],
            })
    result = {**stamp(["python", *sys.argv], pick_device("auto")),
              "dense": args.checkpoint, "dataset": args.dataset, "model": args.model, "rows": rows}
    write_json(out / "psap-protection.json", result)
    write_text(out / "psap-protection.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    lines = [f"# PSAP protection on {r['model']} / {r['dataset']}", "",
             f"- command: `{' '.join(r['command'])}`", f"- commit {r['commit']}, {r['device']}, {r['date']}",
             f"- dense model: {r['dense']}; every cell the same epochs after it (psap steps + fine-tuning)", "",
             "| budget | protection | seeds | accuracy (%) | Δ vs off [95% CI] | restores per step (per seed) | masked "
             "channels with z > 2 | masked z p99 / max |", "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        v = row["vs_off"]
        delta = "-" if v is None else (f"{100 * v['mean']:+.2f} [{100 * v['low']:+.2f}, {100 * v['high']:+.2f}] "
                                       f"{v['verdict']}")
        zmax = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(row["masked_z_p99"], row["masked_z_max"]))
        lines.append(f"| {row['budget']} | {row['protection']} (z {row['protect_z']:g}) | {len(row['seeds'])} | "
                     f"{pct(row['accuracy_mean'])} ± {pct(row['accuracy_std'])} | {delta} | "
                     f"{row['restored_per_step']} | {row['masked_above_2']} of {row['masked']} | {zmax} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
