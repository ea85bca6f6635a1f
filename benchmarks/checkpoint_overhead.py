"""Cost of resumable training: epoch time with progress saved at every epoch end, against without.

The two are timed in turn in one process, the order alternating each round (plain then saved,
saved then plain, ...), so that drift of a shared machine and any first-in-round effect fall
on both; the result is the median of the per-round ratios. Each round trains the same fresh
model for one epoch with the same seed.

An epoch's line is printed only once its state is on disk (fsync of the file and its folder
included); the write still runs beside the next epoch, and ``fit`` waits for the last one
before it returns (in this one-epoch benchmark, every save is such a last one). The time of
one commit is also measured on its own (``commit_s``: a state of the same model saved and
flushed, median of ``--commits`` tries), with ``commit_fraction`` = commit_s / the median
plain epoch: what saving can add to an epoch at most, free of the noise of timing whole
epochs on a shared machine.

    python benchmarks/checkpoint_overhead.py --data-dir data --dataset cifar10 --model conv4 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from compressor import data as datasets
from compressor import models
from compressor.provenance import device_name, versions
from compressor.resume import StageState
from compressor.train import TrainConfig, fit, pick_device


def epoch_seconds(model_name, data, device, state_path, every, seed=0):
    torch.manual_seed(seed)
    model = models.create(model_name, data.num_classes, data.input_shape[0])
    state = StageState(state_path, every) if state_path is not None else None
    start = time.perf_counter()
    fit(model, data, TrainConfig(1, seed=seed), device, desc="bench", state=state)
    return time.perf_counter() - start


def commit_seconds(model_name, data, state_path, tries):
    """Median time of one epoch-end commit (``resume.Writer.save`` + ``flush``, fsync included) of ``fit``'s state
    for a fresh ``model_name`` with an SGD optimizer's momentum buffers, as ``fit`` writes it."""
    from compressor import resume

    model = models.create(model_name, data.num_classes, data.input_shape[0])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(data.example_inputs(2)).sum().backward()
    optimizer.step()  # momentum buffers exist, as after any epoch
    state = {"format": resume.FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": resume.rng_state(), "history": []}
    writer, times = resume.Writer(), []
    for _ in range(tries):
        start = time.perf_counter()
        writer.save(state_path, state)
        writer.flush()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--model", default="conv4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--every", type=int, default=0, help="also save every N steps (0: epoch ends only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--commits", type=int, default=20, help="tries of the epoch-end commit timed on its own")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args()
    device = pick_device(args.device)
    data = datasets.load(args.dataset, args.data_dir, 0.1, 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            path = Path(tmp) / f"round{r}.pt"
            if r % 2 == 0:
                plain = epoch_seconds(args.model, data, device, None, 0)
                saved = epoch_seconds(args.model, data, device, path, args.every)
            else:
                saved = epoch_seconds(args.model, data, device, path, args.every)
                plain = epoch_seconds(args.model, data, device, None, 0)
            rows.append({"plain_s": plain, "saved_s": saved, "ratio": saved / plain,
                         "state_bytes": path.stat().st_size})
            print(f"round {r + 1}: plain {plain:.2f}s, with state saved {saved:.2f}s, ratio {saved / plain:.4f}",
                  flush=True)
        commit = commit_seconds(args.model, data, Path(tmp) / "commit.pt", args.commits)
    plain_median = statistics.median(r["plain_s"] for r in rows)
    print(f"epoch-end commit (save + flush, fsync included): {commit * 1e3:.1f} ms, "
          f"{commit / plain_median:.4%} of the median plain epoch ({plain_median:.2f}s)")
    result = {"command": "python benchmarks/checkpoint_overhead.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device_name(device),
              "dataset": data.name, "model": args.model, "train_images": len(data.train_y), "rounds": rows,
              "median_ratio": statistics.median(r["ratio"] for r in rows), "commit_s": commit,
              "commit_fraction": commit / plain_median, "versions": versions()}
    print(f"median ratio (saved / plain): {result['median_ratio']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
