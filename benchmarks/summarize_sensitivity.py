"""Collect the sensitivity benchmark into benchmarks/results/mnist-conv4-sensitivity.{json,md}.

Usage: python benchmarks/summarize_sensitivity.py EARLY_SENSITIVITY_JSON FINAL_SENSITIVITY_JSON RUN_DIR...
"""
import json
import sys
from pathlib import Path

from scipy.stats import spearmanr

early, final, *runs = sys.argv[1:]
e, f = json.loads(Path(early).read_text()), json.loads(Path(final).read_text())
groups = sorted(f["sensitiveness"])
rho, p = spearmanr([e["sensitiveness"][g] for g in groups], [f["sensitiveness"][g] for g in groups])
rows = []
for run in runs:
    m = json.loads((Path(run) / "metrics.json").read_text())
    rows.append({"run": run, "method": m["method"], "budget_macs": m["budget"]["fraction"],
                 "macs_kept": m["macs"]["fraction"], "params_kept": m["params"]["fraction"],
                 "widths": m["widths"]["pruned"], "acc_dense": m["accuracy"]["dense"]["test"],
                 "acc_pruned": m["accuracy"]["pruned"]["test"], "acc_finetuned": m["accuracy"]["finetuned"]["test"],
                 "finetune_epochs": m["config"]["finetune_epochs"], "command": m["command"],
                 "commit": m["versions"]["commit"], "device": m["device"], "date": m["date"]})
result = {"spearman": {"rho": rho, "p_value": p, "groups": groups, "early": e["sensitiveness"],
                       "final": f["sensitiveness"], "early_accuracy": e["base_accuracy"],
                       "final_accuracy": f["base_accuracy"]},
          "runs": rows}
out = Path(__file__).parent / "results"
(out / "mnist-conv4-sensitivity.json").write_text(json.dumps(result, indent=2) + "\n")
lines = ["| method | MAC budget | MACs kept | params kept | widths | test acc before FT | after FT |",
         "|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['method']} | {r['budget_macs']} | {r['macs_kept']:.2%} | {r['params_kept']:.2%} | "
                 f"{list(r['widths'].values())} | {r['acc_pruned']:.2%} | {r['acc_finetuned']:.2%} |")
lines += ["", f"Spearman rank correlation of layer sensitiveness, early vs final model: rho = {rho:.3f} "
              f"(p = {p:.3f}, {len(groups)} layers)",
          "", "| layer | early sensitiveness | final sensitiveness |", "|---|---|---|"]
lines += [f"| {g} | {e['sensitiveness'][g]:.4f} | {f['sensitiveness'][g]:.4f} |" for g in groups]
(out / "mnist-conv4-sensitivity.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
