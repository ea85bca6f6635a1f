"""Kill `compress run` at chosen moments (SIGKILL), resume it, and tabulate what it cost.

For each moment: whether the resume finished, how many training steps (and epochs) were
trained again, and whether the final plan and weights equal an unbroken run's bit for bit.
The moments come through ``COMPRESSOR_KILL_AT`` (``compressor.files.failpoint``). Steps trained
again = steps the killed process had trained - steps its saved states held when it died.

    python benchmarks/kill_resume.py --out benchmarks/results/cpu-synthetic-kill-resume
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

BASE = ["run", "--model", "conv4", "--dataset", "synthetic", "--batch-size", "64", "--budget-macs", "0.5"]
L1 = BASE + ["--method", "l1", "--epochs", "2", "--finetune-epochs", "2"]
SMOEA = BASE + ["--method", "smoea", "--epochs", "1", "--finetune-epochs", "1", "--population", "4",
                "--generations", "2", "--group-size", "2", "--search-samples", "64", "--step-epochs", "1"]
PSAP = BASE + ["--method", "psap", "--epochs", "1", "--finetune-epochs", "1", "--steps", "2", "--step-epochs", "1",
               "--protect-z", "0"]
SENSITIVITY = BASE + ["--method", "sensitivity", "--epochs", "1", "--finetune-epochs", "0", "--steps", "2",
                      "--step-epochs", "2", "--levels", "0.5"]
FFR = BASE + ["--method", "ffr", "--epochs", "1", "--finetune-epochs", "0", "--ffr-epochs", "2"]

CASES = [  # (name, stage, args, kill point)
    ("l1", "dense training, epoch 2 of 2, mid-epoch", L1, "train-step@20"),
    ("l1", "dense training, epoch 1's state written, not yet renamed", L1, "rename-train.pt"),
    ("l1", "dense.pt written, not yet renamed", L1, "rename-dense.pt"),
    ("l1", "fine-tuning, epoch 1, mid-epoch", L1, "train-step@40"),
    ("l1 --checkpoint-every 4", "dense training, epoch 2, after a step-level save", L1 + ["--checkpoint-every", "4"],
     "train-step@22"),
    ("l1", "metrics.json written, not yet renamed", L1, "rename-metrics.json"),
    ("smoea", "block 1's weights committed, its state not yet", SMOEA, "smoea-weights-written@2"),
    ("smoea", "training between blocks, mid-epoch", SMOEA, "train-step@18"),
    ("smoea", "search, a generation's state written, not yet renamed", SMOEA, "rename-smoea-state.pt@4"),
    ("psap", "masked training, step 2 of 2, mid-epoch", PSAP, "train-step@38"),
    ("psap", "fine-tuning, mid-epoch", PSAP, "train-step@50"),
    ("sensitivity", "training between steps, epoch 2 of 2, mid-epoch", SENSITIVITY, "train-step@38"),
    ("ffr", "regularised training, epoch 2 of 2, mid-epoch", FFR, "train-step@38"),
    ("ffr", "regularised training, epoch 1's state written, not yet renamed", FFR, "rename-ffr.pt"),
]


def compress(args, kill_at=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("COMPRESSOR_KILL_AT", None)
    if kill_at:
        env["COMPRESSOR_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "compressor", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def saved_steps(run: Path) -> tuple[int, int]:
    """(steps held by the saved training states, steps per epoch) of a killed run."""
    held, per_epoch = 0, 0
    for f in (run / ".state").glob("*.pt"):
        state = torch.load(f, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and state.get("format") == "compressor.train-state/1":
            per_epoch = state["fingerprint"]["batches"]
            held += state["epoch"] * per_epoch + state["step"]
    return held, per_epoch


def trained_steps(log: str, kill_at: str, per_epoch: int) -> int:
    if kill_at.startswith("train-step@"):
        return int(kill_at.split("@")[1])
    return len(re.findall(r"epoch \d+/\d+: loss", log)) * per_epoch


def same(a: Path, b: Path) -> bool:
    if (a / "plan.json").read_text() != (b / "plan.json").read_text():
        return False
    wa = torch.load(a / "pruned.pt", weights_only=True)["state_dict"]
    wb = torch.load(b / "pruned.pt", weights_only=True)["state_dict"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="BASE of BASE.json and BASE.md")
    args = p.parse_args()
    rows, unbroken = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, (name, stage, run_args, kill_at) in enumerate(CASES):
            key = " ".join(run_args)
            if key not in unbroken:
                unbroken[key] = tmp / f"unbroken{len(unbroken)}"
                done = compress(run_args + ["--out", str(unbroken[key])])
                assert done.returncode == 0, done.stderr
            run = tmp / f"case{i}"
            killed = compress(run_args + ["--out", str(run)], kill_at)
            held, per_epoch = saved_steps(run)
            resumed = compress(run_args + ["--out", str(run), "--resume"])
            per_epoch = per_epoch or 15
            again = max(trained_steps(killed.stdout, kill_at, per_epoch) - held, 0)
            left = [q.name for q in run.rglob("*") if q.name.endswith(".partial") or q.name == ".state"]
            row = {"method": name, "stage": stage, "kill_at": kill_at, "killed_by_sigkill": killed.returncode == -9,
                   "resumed": resumed.returncode == 0, "steps_trained_again": again,
                   "epochs_trained_again": round(again / per_epoch, 2),
                   "same_plan_and_weights": resumed.returncode == 0 and same(unbroken[key], run),
                   "files_left": left}
            rows.append(row)
            print(json.dumps(row), flush=True)
    from compressor.provenance import device_name, git_commit

    commit = git_commit()

    meta = {"command": "python benchmarks/kill_resume.py" + (f" --out {args.out}" if args.out else ""),
            "commit": commit, "device": device_name(torch.device("cpu")), "data": "synthetic (compressor's, 1024 "
            "train / 256 test images, 3x32x32), conv4, batch 64: 15 steps per epoch",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
    lines = [f"# Kill anywhere, resume: {sum(r['same_plan_and_weights'] for r in rows)}/{len(rows)} equal to the "
             "unbroken run", "", f"Command: `{meta['command']}`  ", f"Commit: {commit}; device: {meta['device']}; "
             f"data: {meta['data']}; date: {meta['date']}", "",
             "| method | killed during | kill point | resumed | steps (epochs) trained again | plan and weights equal, "
             "bit for bit | files left |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['stage']} | `{r['kill_at']}` | {'yes' if r['resumed'] else 'NO'} | "
                     f"{r['steps_trained_again']} ({r['epochs_trained_again']}) | "
                     f"{'yes' if r['same_plan_and_weights'] else 'NO'} | {', '.join(r['files_left']) or 'none'} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(meta, indent=2) + "\n")
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
