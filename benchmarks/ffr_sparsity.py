"""Structured sparsity after training with and without FFR, from the runs' recorded channel scores.

Usage: python benchmarks/ffr_sparsity.py NAME PLAIN FFR_RUN [FFR_RUN...]
PLAIN is a run directory of ``--method ffr --ffr-length 0 --ffr-curvature 0``, or a dense
checkpoint trained from scratch by the pipeline (its training is the same code with no
penalty: same schedule, rate and seed), whose run's metrics.json lies beside it.
Appends a sparsity table to benchmarks/results/NAME.md, adds it to NAME.json and draws
NAME-scales.png: the histogram of each channel's BN scale relative to its layer's largest.
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

name, *runs = sys.argv[1:]
out = Path(__file__).parent / "results"
rows = []
fig, ax = plt.subplots(figsize=(7, 4.5))
def plain_checkpoint(path: str) -> dict:
    """The ffr report's fields for a model trained without the penalty."""
    from compressor import checkpoint, surgery
    from compressor.criteria.ffr import channel_scores, near_zero_share

    model, spec = checkpoint.load(path, with_spec=True)
    scores = channel_scores(surgery.trace(model, spec.example_inputs()))
    m = json.loads(Path(path).with_name("metrics.json").read_text())
    return {"length_weight": 0.0, "curvature_weight": 0.0, "epochs": len(m["history"]["train"]),
            "near_zero_share": near_zero_share(scores), "scores": {g: s.tolist() for g, s in scores.items()},
            "val_accuracy": m["accuracy"]["dense"]["val"], "seconds_per_epoch": m["seconds_per_epoch"]["train"]}


for run in runs:
    if run.endswith(".pt"):
        r = plain_checkpoint(run)
    else:
        r = json.loads((Path(run) / "metrics.json").read_text())["criterion"]["ffr"]
    rel = torch.cat([torch.tensor(s) / max(s) for s in r["scores"].values()])
    label = f"length {r['length_weight']:g}, curvature {r['curvature_weight']:g} ({run})"
    ax.hist(rel.numpy(), bins=40, range=(0, 1), histtype="step", label=label)
    rows.append({"run": run, "length_weight": r["length_weight"], "curvature_weight": r["curvature_weight"],
                 "epochs": r["epochs"], "near_zero_share": r["near_zero_share"],
                 "mean_relative_scale": float(rel.mean()), "mean_scale": float(torch.cat(
                     [torch.tensor(s) for s in r["scores"].values()]).mean()),
                 "val_accuracy": r.get("val_accuracy"), "seconds_per_epoch": r.get("seconds_per_epoch")})
ax.set(xlabel="BN scale / largest in its layer", ylabel="channels", yscale="log",
       title="Channel scales after training, with and without FFR")
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / f"{name}-scales.png", dpi=120)
result = json.loads((out / f"{name}.json").read_text())
result["sparsity"] = rows
(out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
lines = ["", "Structured sparsity after regularised training (before pruning):", "",
         "| run | length w | curvature w | epochs | channels < 1e-2 of layer max | mean |gamma| | "
         "mean gamma / layer max | val acc | s/epoch |", "|---" * 9 + "|"]
for r in rows:
    lines.append(f"| {Path(r['run']).name} | {r['length_weight']:g} | {r['curvature_weight']:g} | {r['epochs']} | "
                 f"{r['near_zero_share']['all']:.2%} | {r['mean_scale']:.4f} | {r['mean_relative_scale']:.4f} | "
                 f"{r['val_accuracy']:.2%} | {r['seconds_per_epoch']:.1f} |")
with open(out / f"{name}.md", "a") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
