"""Time per training step of PSAP's and SMOEA's masked training against a plain step, interleaved in one process.

Usage: python benchmarks/masked_overhead.py [--model vgg16] [--shape 3,32,32] [--batch-size 128] [--device auto]
       [--keep 0.5] [--rounds 5] [--steps 10] [--out PATH.json]

Why: on an H100 a PSAP masked epoch took 4.3 s against 3.0 s plain (`gpu-cifar10-vgg16.md`). A masked
step adds two things to a plain one: the masking hooks (hold the masked channels' gradients and
weights at zero) and, in PSAP, the gradient watch (the mean |gradient| at each layer's input, per
channel). This times each part on its own, so that the cost is found before it is cut:

- ``plain``: forward, backward, SGD step;
- ``mask``: plus ``masking.hooks`` (one fused multiply over all gradients, one over all weights);
- ``mask-indexed``: plus the masking hooks as they were before commit 10d5e39 (an indexed write per
  tensor, twice a step), kept here only to measure against;
- ``mask+watch``: plus ``masking.hooks`` and PSAP's ``GradientWatch``, i.e. a PSAP step;
- ``mask+watch-two-pass``: the same with the watch as it was before (``|grad|`` and an fp32 copy of it
  in full, then the mean), kept here only to measure against.

Random inputs (the cost does not depend on the pixels); ``--keep`` of every group's channels kept by
L1 norm. Rounds run the variants in turn, the order rotating each round, so that drift on a shared
machine hits all; a round's time is the median of its steps, each variant's the median over rounds,
and each ratio is the median of the per-round ratios to ``plain``. Each variant's ATen operator calls per
step are counted too (torch.profiler, one step): on a GPU each is a kernel launch at least, so the count
carries over where the CPU times do not.
With --out PATH, writes the result there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn as nn

from compressor import models
from compressor.bench.harness import time_calls
from compressor.criteria import masking
from compressor.criteria.psap import GradientWatch
from compressor.files import write_json
from compressor.provenance import stamp
from compressor.surgery import trace
from compressor.train import TrainHooks, autocast, pick_device, prepare


def indexed_hooks(graph, masks) -> TrainHooks:
    """The masking hooks before 10d5e39: one indexed write per carrier tensor, for gradients and weights."""
    pairs = []
    for group in graph.groups:
        drop = ~masks[group.name]
        if drop.any():
            pairs += [(c.tensor, c.index[drop.to(c.index.device)]) for c in masking.carriers(graph, group)]

    def clear_grads():
        for t, rows in pairs:
            if t.grad is not None:
                t.grad[rows] = 0

    @torch.no_grad()
    def rezero():
        for t, rows in pairs:
            t[rows] = 0

    return TrainHooks(after_backward=clear_grads, after_step=rezero)


def aten_ops(make, one_step) -> int:
    """Top-level ATen operator calls in one training step (the profiler's, after a warm-up step): on a GPU
    each is at least one kernel launch, so the count says what a variant adds to a step on any device."""
    from torch.profiler import ProfilerActivity, profile

    hooks, close = make()
    try:
        one_step(hooks)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            one_step(hooks)
        # an op's own sub-ops are not counted: a CPU _foreach_mul_ loops over mul_, a CUDA one is fused
        aten = [e for e in prof.events() if e.name.startswith("aten::")]
        return sum(1 for e in aten if not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")))
    finally:
        if close is not None:
            close()


class TwoPassWatch(GradientWatch):
    """PSAP's gradient watch before 9de5090: |grad| and an fp32 copy of it in full, then the mean. It keeps
    today's shortcut of no index where a layer reads exactly the group, so it counts one op per layer fewer
    than the old watch made."""

    def _add(self, group, grad, index=None, dim=1):
        dim = dim % grad.dim()
        g = grad.detach().abs().float().mean([d for d in range(grad.dim()) if d != dim])
        if index is not None:
            g = g[index]
        finite = torch.isfinite(g).all()
        self.sums[group] = self.sums[group].to(g.device) + torch.where(finite, g, torch.zeros_like(g))
        self.steps[group] = self.steps[group].to(g.device) + finite.long()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--shape", default="3,32,32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--keep", type=float, default=0.5, help="share of each group's channels kept (by L1 norm)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--out", help="write the result here (a .json path)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    model = models.create(args.model, 10, shape[0])
    graph = trace(model, torch.randn(1, *shape))
    masks = {g.name: masking.keep_mask(masking.channel_params(graph, g)[0].detach().abs().flatten(1).sum(1),
                                       max(1, round(args.keep * g.width)), g) for g in graph.groups}
    model = prepare(model, device).train()
    x = torch.randn(args.batch_size, *shape, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def mask_and(watch_type):
        def make():
            return masking.hooks(graph, masks), watch_type(graph).close
        return make

    variants = {"plain": lambda: (TrainHooks(), None), "mask": lambda: (masking.hooks(graph, masks), None),
                "mask-indexed": lambda: (indexed_hooks(graph, masks), None), "mask+watch": mask_and(GradientWatch),
                "mask+watch-two-pass": mask_and(TwoPassWatch)}

    def one_step(hooks):
        with autocast(device):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hooks.after_backward is not None:
            hooks.after_backward()
        opt.step()
        if hooks.after_step is not None:
            hooks.after_step()

    def seconds_per_step(make) -> float:
        """Median of ``--steps`` timed steps after 2 untimed ones (the bench harness: CUDA events on a GPU)."""
        hooks, close = make()
        try:
            ms = time_calls(lambda: one_step(hooks), device, warmup=2, min_iters=args.steps, min_seconds=0.0,
                            max_iters=args.steps)
            return statistics.median(ms) / 1e3
        finally:
            if close is not None:
                close()

    names = list(variants)
    ops = {n: aten_ops(variants[n], one_step) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            times[n].append(seconds_per_step(variants[n]))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.1f} ms" for n in names),
              flush=True)
    result = stamp(["python", *sys.argv], device) | {
        "model": args.model, "input": shape, "batch_size": args.batch_size, "keep": args.keep,
        "widths": masking.widths(masks), "rounds": args.rounds, "steps_per_round": args.steps,
        "step_ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
        "aten_ops_per_step": ops, "extra_aten_ops_per_step": {n: ops[n] - ops["plain"] for n in names},
        "ratio_to_plain": {n: statistics.median(a / b for a, b in zip(times[n], times["plain"])) for n in names},
        "per_round_ms": {n: [1e3 * v for v in t] for n, t in times.items()}}
    shown = ("device", "step_ms", "ratio_to_plain", "extra_aten_ops_per_step")
    print(json.dumps({k: result[k] for k in shown}, indent=2))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
