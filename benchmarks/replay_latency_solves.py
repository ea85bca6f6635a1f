#!/usr/bin/env python
"""Replay finished runs' latency solves on the code checked out now, without timing anything.

A run under a latency budget records its latency model (layer weights, beta) and every solve step (the
solver's target and the widths it chose) in metrics.json. This rebuilds that model on the cached table
(``--latency-cache`` or compressor's), re-runs the solver's search at each recorded target, and prints whether
it picks the same widths: a study whose cells ran across commits can show which cells would change.
l1, random and tp-lamp cells only (SMOEA's plans come from a search, not from the solver alone).

  python benchmarks/replay_latency_solves.py STUDY/dense/dense.pt STUDY/fp32/cells/*-latency*-s*
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compressor import checkpoint, surgery  # noqa: E402
from compressor.budget import Budget, global_widths, solve_widths  # noqa: E402
from compressor.criteria.peers import GLOBAL_PEERS, tp_scores  # noqa: E402
from compressor.latency import LatencyModel, LatencySpec  # noqa: E402


def replay(graph, run: Path, round_to: int, max_ratio: float, cache: str | None) -> list[bool]:
    """For each recorded solve step of ``run``: does the search give the recorded widths?"""
    metrics = json.loads((run / "metrics.json").read_text())
    record, method = metrics["latency"], metrics["method"]
    rep = record["model"]
    lat = LatencyModel(graph, LatencySpec("ort-cpu", rep["batch"], rep["precision"], cache_dir=cache, verbose=False),
                       round_to=round_to, max_ratio=max_ratio, measure=False)
    lat.weights, lat.beta, lat.alpha = rep["layer_weights"], rep["beta_ms"], rep["alpha"]
    steps, same = record["solver"]["solves"], []

    def replayed(budget, search, choices):  # in place of measuring: the recorded steps' targets
        same.extend(search(step["solver_target"]) == step["widths"] for step in steps)
        return steps[0]["widths"], {"solves": steps, "chosen": 1}

    lat.solve = replayed
    budget = Budget("latency", record["target"]["fraction"], latency=lat)
    ratios = None
    if method in GLOBAL_PEERS:  # the peer's own allocation, as compressor.criteria.peers spreads it
        start = global_widths(graph, tp_scores(graph, GLOBAL_PEERS[method]()), budget, round_to, max_ratio)
        ratios = {g: 1.0 - start[g] / graph.group(g).width for g in start}
    elif method not in ("l1", "random"):
        raise SystemExit(f"{run}: cannot replay {method!r} (l1, random, {', '.join(GLOBAL_PEERS)})")
    solve_widths(graph, budget, ratios, round_to=round_to, max_ratio=max_ratio)
    return same


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="the dense model the runs pruned")
    p.add_argument("runs", nargs="+", type=Path, help="run directories (a study's cells)")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--max-ratio", type=float, default=0.95)
    p.add_argument("--latency-cache")
    a = p.parse_args(argv)
    model, spec = checkpoint.load(a.checkpoint, with_spec=True)
    graph = surgery.trace(model.cpu().eval(), spec.example_inputs())
    changed = 0
    for run in a.runs:
        same = replay(graph, run, a.round_to, a.max_ratio, a.latency_cache)
        changed += not all(same)
        print(f"{run.name}: {sum(same)} of {len(same)} solve steps give the recorded widths", flush=True)
    print(f"{len(a.runs) - changed} of {len(a.runs)} runs replay exactly")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
