#!/usr/bin/env python
"""Latency budgets on a CPU, measured (issue 17): ONNX Runtime's CPU provider, CIFAR VGG-16.

For each batch size (default 1 and 32) this script
  1. measures (or loads from the cache) the per-layer latency table of the model on ORT CPU and
     fits the latency model; reports the model's error (mean and max relative error of the
     predicted latency fraction) on random width configurations timed whole;
  2. for each target (default 0.5, 0.3, 0.2 of the dense latency) solves the widths with the
     latency budget (the ``l1`` criterion: uniform ratios, filters by L1 norm), including the
     solver's own check-and-correct loop;
  3. builds the MAC-budget plan (same criterion) at equal latency: the MAC fraction whose plan the
     latency model prices at the latency plan's predicted latency (bisection), then refined on
     measured time (up to 3 whole-model checks), so the two plans compete at the same time and the
     question is what each keeps;
  4. times the dense model and every plan in ONE interleaved run (bursts of each model take
     turns, order alternating round by round); each plan's latency fraction is the median of the
     per-round ratios to the dense model; checks each latency plan lands within +/-10% of its target;
  5. reports kept MACs and parameters of both plans at each target and, with ``--checkpoint`` and
     ``--data-dir``, test accuracy after ``--finetune-epochs`` of fine-tuning (same recipe for both);
  6. prints each result as it lands and writes BASE.json and BASE.md with the command, the commit,
     the device, the data and the date.

Grid: widths on multiples of ``--step`` (default 64 for VGG-16), finer where a group would have
fewer than 4 widths (a 64-channel group gets 16, 32, 48, 64), plus the full width.

Usage:
  python benchmarks/cpu_latency_budget.py [--model vgg16] [--batch-sizes 1,32] [--targets 0.5,0.3,0.2]
      [--step 64] [--threads N] [--checkpoint CKPT --data-dir DATA --finetune-epochs 3]
      [--cache DIR] [--out benchmarks/results/cpu-latency-budget-vgg16]
About 10-15 minutes on a 2-core CPU for VGG-16 without fine-tuning (the tables are cached: a second
run skips step 1's measurement). A smoke run (a minute, meaningless numbers):
  python benchmarks/cpu_latency_budget.py --model conv4 --batch-sizes 1 --targets 0.5 --step 16 \\
      --table-iters 3 --validate 2 --final-seconds 1 --out /tmp/latency-smoke
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor import latency, models, surgery  # noqa: E402
from compressor.budget import Budget, solve_widths  # noqa: E402
from compressor.errors import BudgetError  # noqa: E402
from compressor.files import write_json, write_text  # noqa: E402
from compressor.latency.table import library_versions  # noqa: E402
from compressor.latency.timing import Timer  # noqa: E402
from compressor.plan import PruningPlan  # noqa: E402
from compressor.provenance import device_name, git_commit  # noqa: E402

GOAL = 0.10  # each latency plan's measured fraction within +/-10% of its target


def load_model(args):
    """(model, input shape, name, spec or None): a trained checkpoint, or random weights of --model."""
    if args.checkpoint:
        from compressor import checkpoint

        model, spec = checkpoint.load_for_run(args.checkpoint, args.model, 10, 3)
        shape = tuple(spec.input_shape) if spec else (3, 32, 32)
        return model.eval(), shape, (spec.model if spec else args.model), spec
    torch.manual_seed(args.seed)
    c, h, w = (1, 28, 28) if args.model == "conv4" else (3, 32, 32)
    return models.create(args.model, 10, c).eval(), (c, h, w), args.model, None


def mac_plan_at(graph, lat, predicted: float, round_to: int, max_ratio: float):
    """The MAC-budget plan (uniform ratios) whose predicted latency fraction equals ``predicted``."""
    lo, hi, best = 0.02, 1.0, None
    for _ in range(12):
        mid = (lo + hi) / 2
        try:
            sol = solve_widths(graph, Budget("macs", mid), None, round_to, max_ratio)
        except BudgetError:
            lo = mid
            continue
        f = lat.fraction(sol.widths)
        if best is None or abs(f - predicted) < abs(best[1] - predicted):
            best = (sol, f, mid)
        if f > predicted:
            hi = mid
        else:
            lo = mid
        if abs(f - predicted) < 0.005:
            break
    return best


def mac_plan_measured(graph, lat, start, wanted: float, round_to: int, max_ratio: float, tries: int = 3):
    """Refine the MAC plan on measured time: the MAC budget scaled by wanted / measured (latency roughly
    follows MACs) until the plan measures within 5% of ``wanted``; the closest plan measured wins.
    The model priced its widths, but widths off the table's grid are interpolated, and some run slowly."""
    sol, _, m = start
    best, steps = None, []
    for _ in range(tries):
        f = lat.check(sol.widths)["fraction"]
        steps.append({"mac_budget": m, "measured": f})
        if best is None or abs(f - wanted) < abs(best[1] - wanted):
            best = (sol, f, m)
        if abs(f - wanted) / wanted <= 0.05:
            break
        m = min(1.0, max(0.02, m * wanted / f))
        try:
            sol = solve_widths(graph, Budget("macs", m), None, round_to, max_ratio)
        except BudgetError:
            break
    return best, steps


def costs(graph, widths) -> dict:
    dense = surgery.count(graph.model, graph.example_inputs)
    pruned = surgery.count(surgery.pruned_copy(graph.model, PruningPlan.first_channels(widths, graph),
                                               graph.example_inputs), graph.example_inputs)
    return {"macs": pruned.macs / dense.macs, "params": pruned.params / dense.params,
            "macs_abs": pruned.macs, "params_abs": pruned.params}


def finetuned_accuracy(model, graph, widths, data, epochs: int, lr: float, batch_size: int, seed: int) -> dict:
    from compressor.criteria.baselines import filter_l1
    from compressor.train import TrainConfig, evaluate, fit

    device = torch.device("cpu")
    plan = PruningPlan.from_scores(filter_l1(graph), widths, graph)
    pruned = surgery.pruned_copy(model, plan, graph.example_inputs)
    before = evaluate(pruned, data, "test", device)
    fit(pruned, data, TrainConfig(epochs, lr, batch_size, schedule="cosine", seed=seed), device, desc="finetune")
    return {"pruned": before, "finetuned": evaluate(pruned, data, "test", device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16")
    p.add_argument("--checkpoint", help="a trained compressor checkpoint (e.g. conv4 or resnet20 on CIFAR-10)")
    p.add_argument("--data-dir", help="where CIFAR-10 lives (with --checkpoint: accuracy after fine-tuning)")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--targets", default="0.5,0.3,0.2")
    p.add_argument("--step", type=int, default=64, help="table grid step in channels (default 64)")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--max-ratio", type=float, default=0.95)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own, all cores)")
    p.add_argument("--table-iters", type=int, default=10, help="timed calls per table point (median)")
    p.add_argument("--validate", type=int, default=5, help="random width configurations the model's error is "
                   "measured on")
    p.add_argument("--calibrate", type=int, help="whole-model measurements the layer weights are fitted on "
                   "(default: 2 per layer, 8 to 40)")
    p.add_argument("--check-seconds", type=float, default=1.0, help="timing per solver check")
    p.add_argument("--final-seconds", type=float, default=8.0, help="timing of the final interleaved run")
    p.add_argument("--cache", help="latency table cache (default ~/.cache/compressor/latency)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="BASE of BASE.json and BASE.md (default benchmarks/results/cpu-latency-budget-MODEL)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    targets = [float(t) for t in args.targets.split(",") if t.strip()]

    model, shape, name, _ = load_model(args)
    data = None
    if args.checkpoint and args.data_dir:
        from compressor import data as datasets

        data = datasets.load(args.dataset, args.data_dir, 0.1, args.seed)
    started = datetime.datetime.now(datetime.timezone.utc)
    result = {"model": name, "checkpoint": args.checkpoint, "weights": "trained" if args.checkpoint else "random",
              "data": (f"{args.dataset} from {args.data_dir}" if data is not None else "none (random inputs; "
                       "latency does not depend on weights)"),
              "backend": "ort-cpu", "device": device_name(torch.device("cpu")),
              "threads": args.threads or "onnxruntime default", "torch_threads": torch.get_num_threads(),
              "versions": library_versions("ort-cpu"), "python": platform.python_version(),
              "command": shlex.join([sys.executable, *sys.argv]), "commit": git_commit() or "unknown",
              "date": started.isoformat(timespec="seconds"), "step": args.step, "round_to": args.round_to,
              "goal": f"each latency plan within +/-{GOAL:.0%} of its target, measured in one interleaved run",
              "batches": []}
    print(f"{name} ({result['weights']} weights) on ORT CPU, {result['device']}, commit {result['commit']}", flush=True)
    for batch in batches:
        t0 = time.perf_counter()
        graph = surgery.trace(model, torch.randn(2, *shape))
        lspec = latency.LatencySpec("ort-cpu", batch, cache_dir=args.cache, step=args.step, threads=args.threads,
                                    table_iters=args.table_iters, check_seconds=args.check_seconds,
                                    validate=args.validate, calibrate=args.calibrate)
        lat = latency.LatencyModel(graph, lspec, args.round_to, args.max_ratio)
        entry = {"batch": batch, "table": {k: lat.report[k] for k in ("table", "table_from_cache", "table_seconds",
                                                                       "grid")},
                 "dense_ms": lat.dense_ms, "alpha": lat.alpha, "model_error": lat.report["model_error"],
                 "layer_weights": lat.report["layer_weights"], "ridge": lat.report["ridge"],
                 "calibration_configs": lat.report["calibration_configs"],
                 "targets": []}
        err = lat.report["model_error"]
        print(f"[batch {batch}] dense {lat.dense_ms:.3f} ms; "
              f"table {'from cache' if not lat.table.measured else 'measured'}"
              f" ({lat.table.seconds:.0f}s); model error: per-layer (ridge {lat.report['ridge']}) mean "
              f"{err['per_layer']['mean']:.1%} / max {err['per_layer']['max']:.1%}, shared weight mean "
              f"{err['shared_weight']['mean']:.1%}, plain sum+constant mean {err['sum_plus_constant']['mean']:.1%} "
              f"({err['calibrated']['configs']} random widths)", flush=True)
        plans = {}
        for target in targets:
            try:
                sol = solve_widths(graph, Budget("latency", target, latency=lat), None, args.round_to, args.max_ratio)
            except BudgetError as exc:
                entry["targets"].append({"target": target, "error": str(exc)})
                print(f"[batch {batch}] target {target}: {exc}", flush=True)
                continue
            report = sol.fractions["latency"]
            predicted = lat.fraction(sol.widths)
            mac = mac_plan_at(graph, lat, predicted, args.round_to, args.max_ratio)
            refine = []
            if mac is not None:
                mac, refine = mac_plan_measured(graph, lat, mac, sol.fraction, args.round_to, args.max_ratio)
            row = {"target": target, "latency_plan": {"widths": sol.widths, "predicted": predicted,
                                                      "solver_measured": sol.fraction, "solves": len(report["solves"]),
                                                      **costs(graph, sol.widths)}}
            if mac is not None:
                row["mac_plan"] = {"widths": mac[0].widths, "mac_budget": mac[2],
                                   "predicted": lat.fraction(mac[0].widths),
                                   "solver_measured": mac[1], "refine": refine,
                                   **costs(graph, mac[0].widths)}
                plans[f"mac@{target}"] = mac[0].widths
            plans[f"latency@{target}"] = sol.widths
            entry["targets"].append(row)
            lp, mp = row["latency_plan"], row.get("mac_plan", {})
            print(f"[batch {batch}] target {target}: latency plan predicted {predicted:.3f}, solver measured "
                  f"{sol.fraction:.3f} ({lp['solves']} solve(s)), keeps MACs {lp['macs']:.3f} "
                  f"params {lp['params']:.3f}; "
                  f"MAC plan at equal measured latency: MAC budget {mp.get('mac_budget', float('nan')):.3f}, keeps "
                  f"MACs {mp.get('macs', float('nan')):.3f} params {mp.get('params', float('nan')):.3f}", flush=True)
        # one interleaved run: dense and every plan
        final_spec = latency.LatencySpec("ort-cpu", batch, cache_dir=args.cache, step=args.step,
                                         threads=args.threads, check_seconds=args.final_seconds, verbose=False)
        lat.timer = Timer(final_spec, lat.device)
        measured = lat.measure(plans)
        entry["interleaved"] = {"ms": measured["ms"], "fraction": measured["fraction"], "rounds": measured["rounds"],
                                "seconds": args.final_seconds}
        for row in [r for r in entry["targets"] if "error" not in r]:
            t = row["target"]
            f = measured["fraction"].get(f"latency@{t}")
            row["latency_plan"]["measured"] = f
            row["latency_plan"]["within_goal"] = f is not None and abs(f - t) / t <= GOAL
            if "mac_plan" in row:
                row["mac_plan"]["measured"] = measured["fraction"].get(f"mac@{t}")
            lp, mp = row["latency_plan"], row.get("mac_plan", {})
            print(f"[batch {batch}] target {t}: interleaved: latency plan {f:.3f} of dense "
                  f"({'within' if lp['within_goal'] else 'OUTSIDE'} +/-10%), MAC plan "
                  f"{mp.get('measured') or float('nan'):.3f}; at this latency the latency plan keeps "
                  f"{lp['macs']:.1%} MACs / {lp['params']:.1%} params, "
                  f"the MAC plan {mp.get('macs', float('nan')):.1%} / "
                  f"{mp.get('params', float('nan')):.1%}", flush=True)
            if data is not None:
                row["latency_plan"]["accuracy"] = finetuned_accuracy(model, graph, lp["widths"], data,
                                                                     args.finetune_epochs, args.finetune_lr, 128,
                                                                     args.seed)
                if mp:
                    row["mac_plan"]["accuracy"] = finetuned_accuracy(model, graph, mp["widths"], data,
                                                                     args.finetune_epochs, args.finetune_lr, 128,
                                                                     args.seed)
                print(f"[batch {batch}] target {t}: test accuracy after {args.finetune_epochs} epochs: latency plan "
                      f"{row['latency_plan']['accuracy']['finetuned']:.2%}, MAC plan "
                      f"{row.get('mac_plan', {}).get('accuracy', {}).get('finetuned', float('nan')):.2%}", flush=True)
        entry["seconds"] = time.perf_counter() - t0
        result["batches"].append(entry)
    result["seconds"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    base = Path(args.out or ROOT / "benchmarks" / "results" / f"cpu-latency-budget-{name}")
    base.parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(f"{base}.json"), result)  # atomic: a killed run leaves no half-written result
    write_text(Path(f"{base}.md"), markdown(result))
    print(f"wrote {base}.json and {base}.md ({result['seconds']:.0f}s)")
    return 0


def markdown(r: dict) -> str:
    lines = [f"# Latency budget on ORT CPU: {r['model']} ({r['weights']} weights)", "",
             f"- goal: {r['goal']}", f"- command: `{r['command']}`", f"- commit: `{r['commit']}`",
             f"- device: {r['device']}, ONNX Runtime threads: {r['threads']}", f"- versions: {r['versions']}",
             f"- data: {r['data']}", f"- date: {r['date']}",
             f"- table grid: multiples of {r['step']} channels (finer where a group would have < 4 widths), "
             f"round_to {r['round_to']}", ""]
    for b in r["batches"]:
        e = b["model_error"]
        table_source = ("from cache" if b["table"]["table_from_cache"]
                        else "measured in " + format(b["table"]["table_seconds"], ".0f") + "s")
        lines += [f"## batch {b['batch']}", "",
                  f"Dense {b['dense_ms']:.3f} ms. Latency model error on {e['calibrated']['configs']} random "
                  f"widths not used for fitting (relative error of the predicted fraction of dense latency):", "",
                  "| model | mean | max |", "|---|---|---|",
                  f"| per-layer weights, ridge towards alpha (strength {b.get('ridge')}, chosen by leave-one-out on "
                  f"{b.get('calibration_configs')} calibration widths): the model used | {e['per_layer']['mean']:.1%} "
                  f"| {e['per_layer']['max']:.1%} |",
                  f"| one shared weight alpha = {b['alpha']:.3f} | {e['shared_weight']['mean']:.1%} | "
                  f"{e['shared_weight']['max']:.1%} |",
                  f"| plain sum of the table + constant | {e['sum_plus_constant']['mean']:.1%} | "
                  f"{e['sum_plus_constant']['max']:.1%} |", "",
                  f"Table {table_source}.", "",
                  "| target | latency plan: measured | within 10% | MACs kept | params kept | MAC plan: measured "
                  "| MACs kept | params kept | accuracy (latency / MAC plan) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in b["targets"]:
            if "error" in row:
                lines.append(f"| {row['target']} | unreachable: {row['error']} | | | | | | | |")
                continue
            lp, mp = row["latency_plan"], row.get("mac_plan", {})
            acc = ""
            if "accuracy" in lp:
                acc = f"{lp['accuracy']['finetuned']:.2%} / {mp.get('accuracy', {}).get('finetuned', float('nan')):.2%}"
            lines.append(f"| {row['target']} | {lp['measured']:.3f} | {'yes' if lp['within_goal'] else 'no'} | "
                         f"{lp['macs']:.1%} | {lp['params']:.1%} | {mp.get('measured') or float('nan'):.3f} | "
                         f"{mp.get('macs', float('nan')):.1%} | {mp.get('params', float('nan')):.1%} | {acc} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
