#!/usr/bin/env python
"""Does FFR's penalty create structured sparsity? (issue 15) The same FFR cell at a sweep of penalty
weights (length and curvature weight alike), weight 0 being the same training without the penalty.

Each weight is a `compress compare` study of its own (method: ffr only) under OUT/w<weight>, so every cell
is an ordinary run directory and a killed sweep continues where it stopped. Per weight: the share of
channels whose BN scale is below 1e-2 of their layer's largest after the regularised epochs (FFR's
``near_zero_share``), the validation accuracy right after them, the last epoch's length and curvature
terms, the widths FFR chose, and the test accuracy after pruning and fine-tuning. Writes
OUT/ffr-penalty-sweep.{json,md}.

Usage (Conv-4 / CIFAR-10: about 3-6 minutes per cell on one CPU core):
  python benchmarks/ffr_penalty_sweep.py --checkpoint STUDY/dense/dense.pt --data-dir data \\
      --weights 0,0.01,0.1,1,10 --budget params:0.1 --seeds 1 --pruning-epochs 5 --ffr-epochs 2 \\
      --out studies/ffr-sweep
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from compressor.compare import compare, parse_budgets, parse_seeds
from compressor.criteria.ffr import FFRConfig
from compressor.files import write_json, write_text
from compressor.pipeline import RunConfig
from compressor.provenance import stamp
from compressor.rundir import RunDir
from compressor.train import pick_device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="the dense model (a compare study's dense/dense.pt)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir")
    p.add_argument("--model", default="conv4")
    p.add_argument("--weights", default="0,0.01,0.1,1,10", help="penalty weights (length = curvature)")
    p.add_argument("--budget", default="params:0.1")
    p.add_argument("--seeds", default="1")
    p.add_argument("--pruning-epochs", type=int, default=5)
    p.add_argument("--ffr-epochs", type=int, default=2)
    p.add_argument("--round-to", type=int, default=4)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",") if w.strip()]
    budgets, seeds, out = parse_budgets(args.budget), parse_seeds(args.seeds), Path(args.out)
    base = RunConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir, checkpoint=args.checkpoint,
                     pruning_epochs=args.pruning_epochs, round_to=args.round_to)
    rows = []
    for w in weights:
        print(f"== ffr, penalty weight {w:g}", flush=True)
        config = FFRConfig(length=w, curvature=w, epochs=args.ffr_epochs)
        study = compare(base, ["ffr"], budgets, seeds, out / f"w{w:g}", configs={"ffr": config},
                        argv=["python", *sys.argv])
        cells = [c for c in study["cells"] if c["status"] == "complete"]
        reports = [RunDir(c["run"]).read_metrics()["criterion"]["ffr"] for c in cells]
        last = [r["history"][-1] for r in reports if r["history"]]

        def mean(values):
            values = [v for v in values if v is not None]
            return statistics.mean(values) if values else None

        rows.append({
            "weight": w, "seeds": [c["seed"] for c in cells], "commits": sorted({c["commit"] for c in cells}),
            "near_zero_share": mean([r["near_zero_share"]["all"] for r in reports]),
            "near_zero_per_group": [r["near_zero_share"] for r in reports],
            "val_after_ffr": mean([r.get("val_accuracy") for r in reports]),
            # the history holds the weighted terms; over the last (fully ramped) epoch, / w gives the flow's own
            "length": mean([h["ffr_length"] / w for h in last if w and "ffr_length" in h]),
            "curvature": mean([h["ffr_curvature"] / w for h in last if w and "ffr_curvature" in h]),
            "widths": [c["widths"] for c in cells],
            "pruned": mean([c["accuracy"]["pruned"] for c in cells]),
            "finetuned": mean([c["accuracy"]["finetuned"] for c in cells]),
        })
    result = {**stamp(["python", *sys.argv], pick_device("auto")),
              "dense": args.checkpoint, "dataset": args.dataset, "model": args.model, "budget": args.budget,
              "ffr_epochs": args.ffr_epochs, "pruning_epochs": args.pruning_epochs, "rows": rows}
    write_json(out / "ffr-penalty-sweep.json", result)
    write_text(out / "ffr-penalty-sweep.md", markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    def num(x):
        return "-" if x is None else f"{x:.4g}"

    lines = [f"# FFR penalty sweep on {r['model']} / {r['dataset']}", "",
             f"- command: `{' '.join(r['command'])}`", f"- commit {r['commit']}, {r['device']}, {r['date']}",
             f"- dense model: {r['dense']}; {r['ffr_epochs']} regularised epochs (length weight = curvature "
             f"weight = w, ramped over 1 epoch), then pruning to {r['budget']} by BN scale and fine-tuning, "
             f"{r['pruning_epochs']} epochs in all; w = 0 is the same training without the penalty",
             "- near-zero: channels whose BN scale is below 1e-2 of their layer's largest, after the regularised "
             "epochs; flow length and curvature: their mean over the last regularised epoch (unweighted; not "
             "recorded at w = 0); accuracies are means over the seeds listed", "",
             "| w | seeds | near-zero share | val acc after FFR epochs (%) | flow length | flow curvature | widths | "
             "pruned (%) | fine-tuned test (%) |", "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        widths = "; ".join("-".join(str(v) for v in w.values()) for w in row["widths"])
        lines.append(f"| {row['weight']:g} | {len(row['seeds'])} | {pct(row['near_zero_share'])}% | "
                     f"{pct(row['val_after_ffr'])} | {num(row['length'])} | {num(row['curvature'])} | "
                     f"{widths} | {pct(row['pruned'])} | {pct(row['finetuned'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
