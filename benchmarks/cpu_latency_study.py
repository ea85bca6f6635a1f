#!/usr/bin/env python
"""Latency budgets against MAC budgets at equal measured latency (issue 28's study), on ONNX Runtime's CPU provider.

For one model, from one dense model trained once, stage by stage (each stage skips what is done, so the
same command continues an interrupted study):
  1. dense:     ``compress run`` trains the dense model (``--epochs``) in OUT/dense.
  2. calibrate: for each target t (fraction of the dense latency), the MAC budget whose plan measures t:
                l1's uniform MAC plan, priced by the dense model's latency model and refined on measured time
                (``cpu_latency_budget.mac_plan_at`` / ``mac_plan_measured``); OUT/mac-at-latency.json.
                Every method's MAC cells use that MAC fraction, so "MAC budget at target t" means the
                MAC budget that a uniform pruning needs to run at t.
  3. fp32:      ``compress compare`` in OUT/fp32: every method under latency:t (fp32 tables) and under
                macs:f_t, same seeds and epochs; budgets ordered latency:t, macs:f_t per target, so an
                interrupted study holds whole pairs.
  4. int8:      ``compress compare`` in OUT/int8: every method under a latency budget with int8 (QDQ) tables, at
                the int8 latency of each target's uniform MAC plan (timed in the calibrate stage against the
                dense int8 model): int8 keeps a floor of quantize/dequantize work that pruning does not remove
                (Conv-4 at batch 32 cannot go below 0.65 of its dense int8 latency), so the fp32 targets can be
                out of its reach; this way each int8 latency plan meets its MAC plan at equal int8 latency.
  5. measure:   every finished cell's pruned model (its pruned.pt) and the dense model, timed whole in ONE
                interleaved run per precision (fp32: the ONNX export; int8: its QDQ model, as
                ``--export onnx-int8`` deploys), at the study's batch; OUT/measured-{fp32,int8}.json.
                A run is redone when a cell joined since.
  6. why:       per group, for seed 0 of every method and target: the kept width and the share of the dense
                latency it saves (``compressor.latency.why.account``: priced alone by the latency model of that
                precision), MAC plan beside latency plan; OUT/why-{fp32,int8}.json.
  7. report:    RESULTS.json, RESULTS.md and RESULTS.png: per target, method and plan, test accuracy (mean ±
                std over seeds) and measured latency (fraction of dense and ms); paired by seed with 95%
                intervals: each method's latency plan minus its MAC plan, and the best method under a
                latency budget minus tp-lamp under the MAC budget.

Usage (what benchmarks/results/cpu-cifar10-latency-study-*.md ran; see its header for the exact command):
  python benchmarks/subset_imagefolder.py DATA/cifar10 DATA/cifar10-20k --train-per-class 2000
  python benchmarks/cpu_latency_study.py --model conv4 --dataset cifar10-20k --data-dir DATA \\
      --out STUDY/lat-conv4 --results benchmarks/results/cpu-cifar10-latency-study-conv4 [--stages ...]
Run nothing else on the machine meanwhile: the latency cells and the measure stage time models.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from compressor.compare import mean_std, paired_difference  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
from compressor.files import atomic_path, read_json_object, write_json, write_text  # noqa: E402
from compressor.provenance import device_name, git_commit  # noqa: E402
from compressor.rundir import RunDir  # noqa: E402

STAGES = ("dense", "calibrate", "fp32", "int8", "measure", "why", "report")
BACKEND = "ort-cpu"


def compress(*args: str, must: bool = False) -> None:
    """One ``compress`` command, echoed, its output streamed. A compare whose cells failed goes on to the next
    stage (the report lists the missing cells; a re-run retries them); ``must``: a failure ends the study."""
    cmd = [sys.executable, "-m", "compressor.cli", *args]
    print("$ compress " + shlex.join(args), flush=True)
    status = subprocess.run(cmd).returncode
    if status and must:
        sys.exit(f"compress {args[0]} failed with status {status}; re-run this command to continue")
    if status:
        print(f"compress {args[0]} ended with status {status}: going on with the cells that finished", flush=True)


def dense_stage(a) -> Path:
    folder = a.out / "dense"
    if not RunDir(folder).finished():
        compress("run", "--model", a.model, "--dataset", a.dataset, "--data-dir", a.data_dir, "--method", "l1",
                 "--budget-params", "1.0", "--epochs", str(a.epochs), "--finetune-epochs", "0", "--seed", "0",
                 "--out", str(folder), "--resume", must=True)
    return RunDir(folder).dense


def dense_graph(ckpt: Path):
    from compressor import checkpoint, surgery

    model, spec = checkpoint.load(ckpt, with_spec=True)
    return surgery.trace(model.cpu().eval(), spec.example_inputs())


def calibrate_stage(a, ckpt: Path) -> dict:
    """The MAC fraction per target whose uniform (l1) plan measures the target (fp32, whole model)."""
    path = a.out / "mac-at-latency.json"
    found = read_json_object(path, "the study's MAC calibration", f"delete {path} to calibrate again") \
        if path.is_file() else None
    settings = {"batch": a.batch, "backend": BACKEND, "round_to": a.round_to, "max_ratio": a.max_ratio}
    if found is not None and {k: found.get(k, v) for k, v in settings.items()} != settings:
        sys.exit(f"{path} was calibrated with other settings ({ {k: found.get(k) for k in settings} }); "
                 "use another --out")
    missing = [t for t in a.targets if found is None or f"{t:g}" not in found["targets"]]
    graph = dense_graph(ckpt)
    if missing:  # a target added to a study is calibrated alone; the others keep theirs
        from cpu_latency_budget import mac_plan_at, mac_plan_measured

        from compressor import latency

        spec = latency.LatencySpec(BACKEND, a.batch, "fp32", cache_dir=a.cache)
        lat = latency.LatencyModel(graph, spec, a.round_to, a.max_ratio, torch.device("cpu"))
        found = found or {**settings, "dense_ms": lat.dense_ms, "targets": {}}
        for t in missing:
            start = mac_plan_at(graph, lat, t, a.round_to, a.max_ratio)
            if start is None:
                sys.exit(f"calibrate: no MAC budget reaches {t:g} of the dense latency")
            (sol, measured, mac), steps = mac_plan_measured(graph, lat, start, t, a.round_to, a.max_ratio)
            found["targets"][f"{t:g}"] = {"mac_budget": round(mac, 4), "measured": measured, "steps": steps}
            print(f"calibrate: latency {t:g} of dense <- MAC budget {mac:.4f} (uniform plan measured {measured:.3f})",
                  flush=True)
        write_json(path, found)
    if any("int8_target" not in v for v in found["targets"].values()):
        int8_targets(a, graph, found)
        write_json(path, found)
    return found


def int8_targets(a, graph, found: dict) -> None:
    """The int8 latency cells' targets: each uniform MAC plan timed in int8 against the dense int8 model, so the
    int8 latency plans compete with the MAC plans at the MAC plans' own int8 latency (int8 keeps a floor of
    quantize/dequantize work that pruning does not remove, so the fp32 targets may be out of its reach)."""
    from compressor import surgery
    from compressor.budget import Budget, solve_widths
    from compressor.latency import LatencySpec
    from compressor.latency.timing import Timer
    from compressor.plan import PruningPlan

    timer = Timer(LatencySpec(BACKEND, a.batch, "int8", check_seconds=a.measure_seconds / 2, verbose=False),
                  torch.device("cpu"))
    shape = tuple(graph.example_inputs.shape)
    calls = {"dense": timer.callable(graph.model, shape)}
    todo = {t: v for t, v in found["targets"].items() if "int8_target" not in v}  # timed once: cells use them
    for t, v in todo.items():
        widths = solve_widths(graph, Budget("macs", v["mac_budget"]), None, a.round_to, a.max_ratio).widths
        plan = PruningPlan.first_channels(widths, graph)
        calls[t] = timer.callable(surgery.pruned_copy(graph.model, plan, graph.example_inputs).cpu().eval(), shape)
    fraction = timer.compare(calls)["fraction"]
    for t, v in todo.items():
        v["int8_measured"] = fraction[t]
        v["int8_target"] = round(fraction[t], 3)
        print(f"calibrate: the MAC plan for {t} runs at {fraction[t]:.3f} of the dense int8 latency: the int8 "
              f"latency cells' target", flush=True)


def compare_args(a, ckpt: Path, budgets: list[str], precision: str, folder: str) -> list[str]:
    return ["compare", "--model", a.model, "--dataset", a.dataset, "--data-dir", a.data_dir, "--checkpoint",
            str(ckpt), "--methods", a.methods, "--budgets", ",".join(budgets), "--seeds", str(a.seeds),
            "--pruning-epochs", str(a.pruning_epochs), "--round-to", str(a.round_to), "--max-ratio", str(a.max_ratio),
            "--latency-backend", BACKEND, "--latency-batch", str(a.batch), "--latency-precision", precision,
            *(["--latency-cache", a.cache] if a.cache else []), *shlex.split(a.criterion_args),
            "--out", str(a.out / folder)]


def cells(a) -> dict[str, dict]:
    """Every finished cell of the study: key ``study/cell`` -> its compare row."""
    found = {}
    for study in ("fp32", "int8"):
        path = a.out / study / "compare.json"
        if path.is_file():
            for c in json.loads(path.read_text())["cells"]:
                if c["status"] == "complete":
                    found[f"{study}/{c['cell']}"] = {**c, "study": study}
    return found


def measure_stage(a, ckpt: Path, precision: str) -> dict:
    """Every finished cell's pruned model and the dense model, timed in one interleaved run."""
    from compressor import checkpoint, latency
    from compressor.latency.timing import Timer

    path = a.out / f"measured-{precision}.json"
    done = cells(a)
    if path.is_file():
        saved = json.loads(path.read_text())
        if set(saved["fraction"]) >= set(done):
            return saved
    spec = latency.LatencySpec(BACKEND, a.batch, precision, check_seconds=a.measure_seconds, verbose=False)
    timer = Timer(spec, torch.device("cpu"))
    dense, mspec = checkpoint.load(ckpt, with_spec=True)
    shape = (a.batch, *mspec.input_shape)
    print(f"measure: {len(done)} plans and the dense model, {precision}, batch {a.batch}, one interleaved run",
          flush=True)
    calls = {"dense": timer.callable(dense.cpu().eval(), shape)}
    for key, cell in done.items():
        calls[key] = timer.callable(checkpoint.load(RunDir(cell["run"]).pruned).cpu().eval(), shape)
    t0 = time.perf_counter()
    timed = timer.compare(calls)
    result = {"precision": precision, "batch": a.batch, "backend": BACKEND, "device": device_name(torch.device("cpu")),
              "commit": git_commit() or "unknown", "date": _now(), "seconds": time.perf_counter() - t0,
              "rounds": timed["rounds"], "ms": timed["ms"],
              "fraction": {k: v for k, v in timed["fraction"].items() if k != "dense"}}
    write_json(path, result)
    print(f"measure: dense {timed['ms']['dense']:.3f} ms ({precision}); {timed['rounds']} rounds in "
          f"{result['seconds']:.0f}s", flush=True)
    return result


def why_stage(a, ckpt: Path, precision: str, calib: dict, measured: dict) -> dict:
    """Seed 0's MAC and latency plans of each method, group by group, on the latency model of ``precision``."""
    from compressor import checkpoint, latency
    from compressor.latency import why

    path = a.out / f"why-{precision}.json"
    done = cells(a)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("cells") == sorted(done):
            return saved
    lat = latency.LatencyModel(dense_graph(ckpt), latency.LatencySpec(BACKEND, a.batch, precision, cache_dir=a.cache),
                               a.round_to, a.max_ratio, torch.device("cpu"))
    plans = [PLANS[0], next(pl for pl in PLANS[1:] if pl[1] == precision)]
    found = {"precision": precision, "cells": sorted(done), "model_error": lat.report.get("model_error"),
             "targets": {}}
    for t in a.targets:
        for method in dict.fromkeys(c["method"] for c in done.values()):
            for plan in plans:
                cell = plan_cells(done, calib, method, t, plan).get(0)
                if cell is None:
                    continue
                key = f"{cell['study']}/{cell['cell']}"
                widths = lat.widths_of(checkpoint.load(RunDir(cell["run"]).pruned))
                if key in measured["fraction"] and widths:
                    found["targets"].setdefault(f"{t:g}", {}).setdefault(method, {})[plan[0]] = {
                        "cell": key, **why.account(lat, widths, measured["fraction"][key])}
    write_json(path, found)
    return found


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# report ----------------------------------------------------------------------------------------

PLANS = (("macs", "fp32", "MAC budget"), ("latency", "fp32", "latency budget, fp32 tables"),
         ("latency", "int8", "latency budget, int8 tables"))


def plan_cells(done: dict, calib: dict, method: str, target: float, plan: tuple) -> dict[int, dict]:
    """seed -> cell, for one method, target and plan kind."""
    metric, tables, _ = plan
    study = "int8" if tables == "int8" else "fp32"
    entry = calib["targets"][f"{target:g}"]
    fraction = entry["mac_budget"] if metric == "macs" else entry["int8_target"] if tables == "int8" else target
    return {c["seed"]: c for k, c in done.items() if c["study"] == study and c["method"] == method
            and c["metric"] == metric and abs(c["fraction"] - fraction) < 1e-9}


def report(a, calib: dict, measured: dict) -> dict:
    done = cells(a)
    methods = list(dict.fromkeys(c["method"] for c in done.values()))
    rows, pairs = [], []
    for t in a.targets:
        for method in methods:
            by_plan = {}
            for plan in PLANS:
                seeds = plan_cells(done, calib, method, t, plan)
                if not seeds:
                    continue
                key = {s: f"{c['study']}/{c['cell']}" for s, c in seeds.items()}
                row = {"target": t, "method": method, "plan": plan[2], "metric": plan[0], "tables": plan[1],
                       "seeds": sorted(seeds), "budget": f"{plan[0]}:{seeds[min(seeds)]['fraction']:g}",
                       "accuracy": dict(zip(("mean", "std"), mean_std([c["accuracy"]["finetuned"]
                                                                      for c in seeds.values()]))),
                       "kept_macs": statistics.mean(c["kept"]["macs"] for c in seeds.values())}
                for precision, m in measured.items():
                    fr = [m["fraction"][key[s]] for s in seeds if key[s] in m["fraction"]]
                    if fr:
                        row[f"latency_{precision}"] = dict(zip(("mean", "std"), mean_std(fr)))
                        row[f"ms_{precision}"] = statistics.mean(m["ms"][key[s]] for s in seeds if key[s] in m["ms"])
                row["per_seed"] = {s: {"accuracy": c["accuracy"]["finetuned"],
                                       **{f"latency_{p}": m["fraction"].get(key[s]) for p, m in measured.items()}}
                                   for s, c in seeds.items()}
                rows.append(row)
                by_plan[plan] = row
            mac = by_plan.get(PLANS[0])
            for plan in PLANS[1:]:
                if mac and plan in by_plan:
                    pairs.append(_pair(t, f"{method}, {plan[2]}", by_plan[plan], f"{method}, MAC budget", mac,
                                       "int8" if plan[1] == "int8" else "fp32"))
        for plan in PLANS[1:]:  # the best method under a latency budget against tp-lamp under the MAC budget
            lat_rows = [r for r in rows if r["target"] == t and r["plan"] == plan[2]]
            lamp = [r for r in rows if r["target"] == t and r["plan"] == PLANS[0][2] and r["method"] == "tp-lamp"]
            if lat_rows and lamp:
                best = max(lat_rows, key=lambda r: r["accuracy"]["mean"])
                pairs.append(_pair(t, f"best: {best['method']}, {plan[2]}", best, "tp-lamp, MAC budget", lamp[0],
                                   "int8" if plan[1] == "int8" else "fp32", best_of=True))
    return {"rows": rows, "pairs": pairs}


def _pair(target, name, mine, ref_name, ref, precision, best_of=False) -> dict:
    acc = {s: v["accuracy"] for s, v in mine["per_seed"].items()}
    ref_acc = {s: v["accuracy"] for s, v in ref["per_seed"].items()}
    lat = {s: v.get(f"latency_{precision}") for s, v in mine["per_seed"].items()}
    ref_lat = {s: v.get(f"latency_{precision}") for s, v in ref["per_seed"].items()}
    lat_diff = paired_difference({s: v for s, v in lat.items() if v is not None},
                                 {s: v for s, v in ref_lat.items() if v is not None})
    return {"target": target, "plan": name, "against": ref_name, "precision": precision, "best_of": best_of,
            "accuracy": paired_difference(acc, ref_acc), "latency": lat_diff}


def markdown(r: dict) -> str:
    c = r["calibration"]
    lines = [f"# Latency budgets against MAC budgets at equal measured latency: {r['model']} on {r['dataset']}", "",
             f"- command: `{r['command']}`",
             f"- commit {r['commit']} (cells ran at {', '.join(r['cell_commits']) or '-'}), {r['device']}, "
             f"{r['date']}",
             f"- data: {r['dataset']} from {r['data_dir']} ({r['data_note']}); test accuracy on the whole test split",
             f"- dense model: {r['dense']['accuracy']:.2%} test accuracy after {r['dense']['epochs']} epochs; "
             f"every cell {r['pruning_epochs']} epochs after it (criterion's own + fine-tuning), seeds "
             f"{', '.join(map(str, r['seeds']))}",
             f"- latency: ONNX Runtime CPU at batch {r['batch']}; dense "
             + ", ".join(f"{m['ms']['dense']:.3f} ms {p}" for p, m in r["measured"].items())
             + "; every plan measured whole in one interleaved run per precision (median of per-round ratios to "
             "dense); int8 = the QDQ model `--export onnx-int8` deploys",
             "- MAC budget at target t: the MAC fraction whose uniform (l1) plan measures t of the dense fp32 "
             "latency: " + ", ".join(f"t={t}: macs:{v['mac_budget']:g} (measured {v['measured']:.3f})"
                                     for t, v in c["targets"].items() if float(t) in r["targets"]),
             "- int8 latency cells at target t: the int8 latency of that uniform MAC plan, as a fraction of the dense "
             "int8 model's (timed interleaved with it): " + ", ".join(
                 f"t={t}: latency:{v['int8_target']:g}" for t, v in c["targets"].items() if float(t) in r["targets"]),
             f"- criterion settings: `{r['criterion_args'] or 'defaults'}`",
             "- Δ: paired by seed, mean [95% CI from the t distribution]; better/worse only where the interval "
             "excludes 0", "",
             "| target | method | plan | budget | seeds | kept MACs | latency fp32 (of dense) | ms fp32 | "
             "latency int8 (of dense int8) | ms int8 | accuracy % |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def lat(row, p):
        v = row.get(f"latency_{p}")
        return "-" if v is None else f"{v['mean']:.3f} ± {(v['std'] or 0):.3f}"

    for row in r["rows"]:
        a = row["accuracy"]
        lines.append(f"| {row['target']:g} | {row['method']} | {row['plan']} | {row['budget']} | "
                     f"{len(row['seeds'])} | {row['kept_macs']:.3f} | {lat(row, 'fp32')} | "
                     f"{row.get('ms_fp32', float('nan')):.3f} | "
                     f"{lat(row, 'int8')} | {row.get('ms_int8', float('nan')):.3f} | "
                     f"{100 * a['mean']:.2f} ± {100 * (a['std'] or 0):.2f} |")
    lines += ["", "## Paired differences", "",
              "| target | plan | against | Δ accuracy (points) [95% CI] | verdict | Δ measured latency "
              "(of dense) [95% CI] | timed in |", "|---|---|---|---|---|---|---|"]
    for p in r["pairs"]:
        d, l_ = p["accuracy"], p["latency"]
        acc = "n < 2" if d is None else f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
        latd = "-" if l_ is None else f"{l_['mean']:+.3f} [{l_['low']:+.3f}, {l_['high']:+.3f}]"
        verdict = "" if d is None else d["verdict"]
        if verdict and l_ is not None and l_["low"] > 0:
            verdict += ", but slower"
        elif verdict and l_ is not None and l_["high"] < 0:
            verdict += ", and faster"
        lines.append(f"| {p['target']:g} | {p['plan']} | {p['against']} | {acc} | {verdict} | {latd} | "
                     f"{p['precision']} |")
    expected = len(r["seeds"]) * len(r["targets"]) * len(PLANS) * len(r["methods"])
    found = sum(len(row["seeds"]) for row in r["rows"])
    if found < expected:
        lines += ["", f"**{expected - found} of {expected} cells are missing** (failed or not run yet): rows with "
                  "fewer seeds than the header's, and pairs over the seeds both sides have."]
    lines += ["", "A latency plan beats its MAC plan at equal measured latency where its accuracy interval is above 0 "
              "and its latency difference is not above 0 (it is no slower). A \"best\" row takes the method with the "
              "highest mean accuracy under that latency budget, chosen after seeing these seeds: its interval is "
              "optimistic.", ""]
    for precision, w in r.get("why", {}).items():
        lines += why_markdown(precision, w)
    return "\n".join(lines)


def why_markdown(precision: str, w: dict) -> list[str]:
    """Per target: a row per group, each method's MAC plan beside its latency plan (seed 0): kept width (share
    of the dense latency that group saves alone)."""
    err = (w.get("model_error") or {}).get("per_layer") or {}
    lines = [f"## Per group, {precision} (seed 0; `compressor.latency.why`)", "",
             "Kept width (share of the dense latency the group saves alone, on the latency model); last rows: "
             "the groups' interaction, the predicted and the measured saving"
             + (f" (model error on random widths: mean {err['mean']:.1%}, max {err['max']:.1%})" if err.get("mean")
                is not None else "") + ".", ""]
    for t, methods in w["targets"].items():
        cols = [(m, kind) for m, plans in methods.items() for kind in ("macs", "latency") if kind in plans]
        groups = list(dict.fromkeys(g["group"] for plans in methods.values() for acc in plans.values()
                                    for g in acc["groups"]))
        lines += [f"### target {t}", "", "| group | " + " | ".join(f"{m} {'MAC' if k == 'macs' else 'latency'}"
                                                                  for m, k in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for g in groups:
            cells_ = []
            for m, k in cols:
                row = next((x for x in methods[m][k]["groups"] if x["group"] == g), None)
                cells_.append("-" if row is None else f"{row['dense']}→{row['kept']} ({row['share_of_time_saved']:.1%})"
                              + (" slow step" if row["slow_step"] else ""))
            lines.append(f"| {g} | " + " | ".join(cells_) + " |")
        for label, key in (("interaction", "interaction"), ("predicted saving", "predicted"),
                           ("measured saving", "measured")):
            lines.append(f"| *{label}* | " + " | ".join(f"{methods[m][k]['saved'][key]:+.1%}" for m, k in cols) + " |")
        lines.append("")
    return lines


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    precisions = list(r["measured"])
    fig, axes = plt.subplots(1, len(precisions), figsize=(6.5 * len(precisions), 4.8), squeeze=False)
    marker = {"MAC budget": "o", "latency budget, fp32 tables": "s", "latency budget, int8 tables": "^"}
    methods = list(dict.fromkeys(row["method"] for row in r["rows"]))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, p in zip(axes[0], precisions):
        for row in r["rows"]:
            if f"ms_{p}" not in row:
                continue
            ax.errorbar(row[f"ms_{p}"], 100 * row["accuracy"]["mean"], yerr=100 * (row["accuracy"]["std"] or 0),
                        marker=marker[row["plan"]], color=colors[row["method"]], capsize=3,
                        fillstyle="none" if row["metric"] == "macs" else "full", linestyle="none")
        ax.axvline(r["measured"][p]["ms"]["dense"], color="grey", linestyle=":", label="dense")
        for m in methods:
            ax.plot([], [], color=colors[m], marker="o", linestyle="none", label=m)
        for name, mk in marker.items():
            ax.plot([], [], color="black", marker=mk, linestyle="none",
                    fillstyle="none" if name == "MAC budget" else "full", label=name)
        ax.set(xlabel=f"measured ms per batch of {r['batch']} ({p}, ORT CPU)",
               ylabel="test accuracy after fine-tuning (%)",
               title=f"{r['model']} / {r['dataset']}: mean ± std over {len(r['seeds'])} seeds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--data-note", default="", help="what the data is, for the report (e.g. a subset's size)")
    p.add_argument("--out", type=Path, required=True, help="the study's folder")
    p.add_argument("--results", type=Path, help="BASE of BASE.json/.md/.png (stage report)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--methods", default="l1,random,tp-lamp,smoea")
    p.add_argument("--targets", default="0.5,0.3", help="fractions of the dense latency")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10, help="dense training epochs")
    p.add_argument("--pruning-epochs", type=int, default=2, help="epochs every cell trains after the dense model")
    p.add_argument("--batch", type=int, default=32, help="the latency batch")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--max-ratio", type=float, default=0.95)
    p.add_argument("--criterion-args", default="--group-size 2 --population 12 --generations 6 "
                   "--search-samples 1024 --step-epochs 0",
                   help="passed to both compare commands (default: the SMOEA settings of the CPU studies)")
    p.add_argument("--cache", help="latency table cache (default: compressor's)")
    p.add_argument("--measure-seconds", type=float, default=60.0, help="timing of each interleaved run")
    a = p.parse_args(argv)
    try:
        a.targets = [float(t) for t in a.targets.split(",") if t.strip()]
    except ValueError:
        p.error(f"--targets takes fractions of the dense latency, e.g. 0.5,0.3; not {a.targets!r}")
    if not a.targets or any(not 0 < t < 1 for t in a.targets):
        p.error(f"--targets takes fractions of the dense latency in (0, 1), e.g. 0.5,0.3; not {a.targets}")
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    if set(stages) - set(STAGES):
        p.error(f"--stages takes {', '.join(STAGES)}")
    try:
        ckpt = dense_stage(a) if "dense" in stages else RunDir(a.out / "dense").dense
        if not ckpt.is_file():
            sys.exit(f"no dense model at {ckpt}: run the dense stage first")
        calib = calibrate_stage(a, ckpt) if {"calibrate", "fp32", "int8"} & set(stages) else None
        if "fp32" in stages:
            budgets = [b for t in a.targets for b in (f"latency:{t:g}",
                                                     f"macs:{calib['targets'][f'{t:g}']['mac_budget']:g}")]
            compress(*compare_args(a, ckpt, budgets, "fp32", "fp32"))
        if "int8" in stages:
            compress(*compare_args(a, ckpt, [f"latency:{calib['targets'][f'{t:g}']['int8_target']:g}"
                                             for t in a.targets], "int8", "int8"))
        measured = {}
        if {"measure", "why", "report"} & set(stages):
            measured = {p_: measure_stage(a, ckpt, p_) for p_ in ("fp32", "int8")}
        whys = {}
        if "why" in stages or "report" in stages:
            calib = calib or read_json_object(a.out / "mac-at-latency.json", "the study's MAC calibration", "")
            whys = {p_: why_stage(a, ckpt, p_, calib, measured[p_]) for p_ in ("fp32", "int8")}
        if "report" in stages:
            calib = calib or read_json_object(a.out / "mac-at-latency.json", "the study's MAC calibration", "")
            dense = RunDir(a.out / "dense").record("")
            result = {"format": "compressor.latency-study/1", "model": a.model, "dataset": a.dataset,
                      "data_dir": a.data_dir, "data_note": a.data_note,
                      "command": shlex.join([sys.executable, *sys.argv]), "commit": git_commit() or "unknown",
                      "device": device_name(torch.device("cpu")), "date": _now(), "batch": a.batch,
                      "seeds": list(range(a.seeds)), "pruning_epochs": a.pruning_epochs, "targets": a.targets,
                      "methods": [m.strip() for m in a.methods.split(",") if m.strip()],
                      "criterion_args": a.criterion_args,
                      "dense": {"accuracy": dense.accuracy.dense.test, "epochs": dense.epochs.dense},
                      "cell_commits": sorted({c.get("commit") for c in cells(a).values() if c.get("commit")}),
                      "calibration": calib, "measured": measured, "why": whys, **report(a, calib, measured)}
            base = a.results or a.out / "latency-study"
            base.parent.mkdir(parents=True, exist_ok=True)
            write_json(Path(f"{base}.json"), result)
            write_text(Path(f"{base}.md"), markdown(result))
            plot(result, Path(f"{base}.png"))
            print(f"wrote {base}.json, .md and .png")
    except CompressorError as exc:
        sys.exit(f"error: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
