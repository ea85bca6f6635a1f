"""Collect finished runs into benchmarks/results/NAME.{json,md}: one row per run directory.

Usage: python benchmarks/summarize_runs.py NAME RUN_DIR...
Each row keeps the command, commit, device and date from the run's metrics.json.
"""
import json
import sys
from pathlib import Path


def total_epochs(m: dict) -> int:
    """Every epoch of training the result saw: dense (including the checkpoint's), the criterion's, fine-tuning."""
    epochs = m["config"]["epochs"] + m["config"]["finetune_epochs"]
    if m["config"]["checkpoint"]:
        epochs += len(json.loads(Path(m["config"]["checkpoint"]).with_name("metrics.json").read_text())
                      ["history"]["train"])
    for r in m["criterion"].values():  # runs recorded before "train_epochs" existed: count the step histories
        epochs += r.get("train_epochs", sum(len(s.get("history", [])) for s in r.get("steps", [])
                                            if isinstance(s, dict)) + len(r.get("history", [])))
    return epochs


def row(run: str) -> dict:
    m = json.loads((Path(run) / "metrics.json").read_text())
    crit = m["criterion"].get(m["method"], {})
    return {"run": run, "method": m["method"], "from_scratch": m["config"].get("from_scratch", False),
            "budget": f"{m['budget']['fraction']:g} of {m['budget']['metric']}",
            "macs_kept": m["macs"]["fraction"], "params_kept": m["params"]["fraction"],
            "widths": m["widths"]["pruned"], "total_epochs": total_epochs(m),
            "acc_dense": m["accuracy"]["dense"]["test"], "acc_pruned": m["accuracy"]["pruned"]["test"],
            "acc_finetuned": m["accuracy"]["finetuned"]["test"],
            "restored_per_step": crit.get("restored_per_step"), "protect_z": crit.get("protect_z"),
            "regrown_per_step": [sum(s.get("regrown", {}).values()) for s in crit.get("steps", [])
                                 if isinstance(s, dict)] or None,
            "seconds": m["seconds"]["total"],
            "search_seconds": crit.get("search_seconds"), "candidates_per_second": crit.get("candidates_per_second"),
            "command": " ".join(m["command"] or []), "commit": m["versions"]["commit"], "device": m["device"],
            "date": m["date"]}


def notes(r: dict) -> str:
    found = []
    if r["restored_per_step"] is not None:
        found.append(f"restored per step {r['restored_per_step']} (--protect-z {r['protect_z']:g})")
    if r.get("regrown_per_step") is not None and any(r["regrown_per_step"]):
        found.append(f"regrown per step {r['regrown_per_step']}")
    if r["search_seconds"] is not None:
        found.append(f"search {r['search_seconds']:.0f} s, {r['candidates_per_second']:.1f} candidates/s")
    return "; ".join(found)


def main(name: str, runs: list[str]) -> None:
    finished = [r for r in runs if (Path(r) / "metrics.json").is_file()]
    for r in sorted(set(runs) - set(finished)):
        print(f"skipped {r}: no metrics.json (the run did not finish)")
    rows = [row(r) for r in finished]
    out = Path(__file__).parent / "results"
    (out / f"{name}.json").write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    lines = ["| method | from scratch | budget | MACs kept | params kept | widths | total epochs | "
             "test acc after pruning | after fine-tuning | criterion notes |", "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {'yes' if r['from_scratch'] else 'no'} | {r['budget']} | "
                     f"{r['macs_kept']:.2%} | {r['params_kept']:.2%} | {list(r['widths'].values())} | "
                     f"{r['total_epochs']} | {r['acc_pruned']:.2%} | {r['acc_finetuned']:.2%} | {notes(r)} |")
    lines += ["", "Commands (in row order):", ""] + [f"    {r['command']}" for r in rows]
    lines += ["", f"Device: {rows[0]['device']}; commit {rows[0]['commit']}; "
                  f"dates {rows[0]['date']} .. {rows[-1]['date']}."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
