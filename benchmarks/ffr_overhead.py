"""Time per training step with and without the FFR penalty, interleaved in one process.

Usage: python benchmarks/ffr_overhead.py [--model conv4] [--shape 1,28,28] [--batch-size 128] [--device auto]
       [--rounds 7] [--steps 20] [--compile auto|on|off] [--out NAME]
Random inputs (the cost does not depend on the pixels). Rounds alternate plain and FFR so
that drift on a shared machine hits both; the overhead is the ratio of the medians. One
untimed round of each comes first (it compiles the penalty, where it is compiled).
With --out, writes benchmarks/results/NAME.json.
"""
import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

from compressor import models
from compressor.criteria.ffr import compile_penalty, regularised
from compressor.provenance import device_name, versions
from compressor.train import autocast, pick_device, prepare

p = argparse.ArgumentParser()
p.add_argument("--model", default="conv4")
p.add_argument("--shape", default="1,28,28")
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--device", default="auto")
p.add_argument("--rounds", type=int, default=7)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
               help="torch.compile the penalty (auto: on a GPU only, as training does)")
p.add_argument("--out")
args = p.parse_args()
device = pick_device(args.device)
shape = tuple(int(v) for v in args.shape.split(","))
torch.manual_seed(0)
model = prepare(models.create(args.model, 10, shape[0]), device).train()
x = torch.randn(args.batch_size, *shape, device=device)
if device.type == "cuda":
    x = x.contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (args.batch_size,), device=device)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
loss_fn = nn.CrossEntropyLoss()


def steps(hooks) -> float:
    def one():
        with autocast(device):
            loss = loss_fn(model(x), y)
            if hooks is not None:
                loss = loss + sum(hooks.penalty(1.0).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps


compiled = compile_penalty(args.compile, model)
with regularised(model, 0.01, 0.01, 0.0, compiled=compiled) as hooks:  # untimed: compiles, if it does
    steps(hooks)
steps(None)
plain, ffr = [], []
for _ in range(args.rounds):  # the compiled penalty is built once per process and reused
    plain.append(steps(None))
    with regularised(model, 0.01, 0.01, 0.0, compiled=compiled) as hooks:
        ffr.append(steps(hooks))
result = {"model": args.model, "input": shape, "batch_size": args.batch_size, "device": device_name(device),
          "penalty_compiled": compiled,
          "plain_step_s": statistics.median(plain), "ffr_step_s": statistics.median(ffr),
          "overhead": statistics.median(ffr) / statistics.median(plain) - 1.0, "rounds": args.rounds,
          "steps_per_round": args.steps, "command": "python " + " ".join(sys.argv),
          "commit": versions()["commit"], "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
print(json.dumps(result, indent=2))
if args.out:
    (Path(__file__).parent / "results" / f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
