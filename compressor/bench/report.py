"""bench.json -> a Markdown summary (in the manner of trtexec's and Model Optimizer's) and two plots."""
from __future__ import annotations

from pathlib import Path

from ..files import atomic_path
from .backends import BACKENDS, PRECISIONS

PRECISION_ORDER = PRECISIONS  # fp32, fp16, int8


def speedups(points: list[dict]) -> list[dict]:
    """Measured dense/pruned speedup per backend, precision and batch: the median of the per-round
    ratios of the interleaved timing (and the ratio of the two medians beside it)."""
    out = []
    for p in points:
        if p.get("status") != "ok" or not p.get("speedup"):
            continue
        entry = {"backend": p["backend"], "precision": p["precision"], "batch": p["batch"], "speedup": p["speedup"],
                 "speedup_iqr": p.get("speedup_iqr"), "rounds": p.get("rounds"),
                 "speedup_of_medians": p.get("speedup_of_medians")}
        if p.get("speedup_with_transfers"):
            entry["speedup_with_transfers"] = p["speedup_with_transfers"]
        out.append(entry)
    return out


def _fraction(value) -> float | None:
    """An accuracy as a fraction, from a number (fraction or percent) or a dict holding one."""
    if isinstance(value, dict):
        value = next((value[k] for k in ("top1", "test", "accuracy", "value") if k in value), None)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value / 100.0 if value > 1.0 else float(value)


def accuracy(result: dict, backend: str, precision: str) -> tuple[float | None, float | None]:
    """(dense, pruned) full-test-set top-1 for this backend and precision, where the run recorded one:
    PyTorch fp32 from metrics.json, an artifact's from export.json (``[format]["accuracy"]``)."""
    acc = result.get("accuracy") or {}
    dense = pruned = None  # the dense model is only evaluated in PyTorch fp32 (export covers the pruned one)
    export = result.get("export") or {}
    source = BACKENDS.get(backend).info.get("accuracy") if backend in BACKENDS else None  # see backends.py
    if source == "pytorch":
        if precision == "fp32":
            dense = _fraction((acc.get("dense") or {}).get("test")) if isinstance(acc.get("dense"), dict) else None
            pruned = (_fraction((acc.get("finetuned") or {}).get("test")) if isinstance(acc.get("finetuned"), dict)
                      else None)
    elif source == "onnx":
        if precision == "int8":
            entry = next((v for k, v in export.items() if "int8" in k and "onnx" in k), export.get("int8"))
        else:
            entry = export.get("onnx")
            if isinstance(entry, dict) and bool(entry.get("fp16")) != (precision == "fp16"):
                entry = export.get(f"onnx-{precision}") or export.get(f"onnx_{precision}")
        pruned = _fraction(entry.get("accuracy")) if isinstance(entry, dict) else None
    elif source:  # the export format of the same name holds it, at its precision
        entry = export.get(source)
        if isinstance(entry, dict) and entry.get("precision", "fp32") == precision:
            pruned = _fraction(entry.get("accuracy"))
    return dense, pruned


def _pair(a, b, fmt) -> str:
    show = lambda v: "—" if v is None else fmt(v)  # noqa: E731
    return f"{show(a)} → {show(b)}"


def _mb(n):
    return f"{n / 1e6:.1f}"


def _pct(v):
    return f"{v:.2%}"


def _ms(v):
    return f"{v:.3f}"


def markdown(result: dict) -> str:
    points = sorted(result.get("points") or [], key=lambda p: (p["backend"], PRECISION_ORDER.index(p["precision"])
                                                               if p["precision"] in PRECISION_ORDER else 9, p["batch"]))
    acc = result.get("accuracy") or {}
    commands = [result.get("command")] + ([result["first_command"]] if result.get("first_command") not in
                                          (None, result.get("command")) else [])
    timing = result["timing"]
    lines = [
        f"# Benchmark: {result['model']} ({result['dataset']}), dense vs pruned",
        "",
        f"- device: {result['device']}",
        f"- command: `{' '.join(result['command'] or [])}`"
        + (f" (started by `{' '.join(result['first_command'])}`)" if len(commands) > 1 and commands[1] else ""),
        f"- date: {result['date']} (first point {result.get('started')}); commit: {result['versions'].get('commit')}; "
        f"torch {result['versions'].get('torch')}, onnxruntime {result['versions'].get('onnxruntime')}",
        f"- MACs: dense {result['macs']['dense'] / 1e6:.2f} M, pruned {result['macs']['pruned'] / 1e6:.2f} M "
        f"(MAC speedup {result['mac_speedup']:.2f}x); params {result['params']['dense'] / 1e6:.3f} M -> "
        f"{result['params']['pruned'] / 1e6:.3f} M",
    ]
    if isinstance(acc.get("dense"), dict) and isinstance(acc.get("finetuned"), dict):
        lines.append(f"- test accuracy (PyTorch fp32): dense {acc['dense']['test']:.2%}, "
                     f"pruned + fine-tuned {acc['finetuned']['test']:.2%}")
    lines.append(f"- timing: {timing['clock']}; {timing['method']} (>= {timing['rounds']} rounds, "
                 f">= {timing['min_iters']} calls and >= {timing['min_seconds']:g} s per model, after "
                 f"{timing['warmup']} warm-up calls); torch.compile mode {timing['compile_mode']}; "
                 f"each build and point capped at {timing['point_seconds']:g} s")
    if not result.get("complete", True):
        lines.append("- **incomplete**: the time budget ran out; `compress bench RUN --resume` does the rest")
    lines += ["", "## Summary", "",
              "| backend | batch | precision | format | size MB | top-1 | p50 ms | p99 ms | img/s | "
              "measured speedup | MAC speedup | with transfers | CUDA graphs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        if p["status"] != "ok":
            continue
        d, q = p["models"]["dense"]["compute"], p["models"]["pruned"]["compute"]
        sizes = p.get("artifact_bytes") or {}
        dense_acc, pruned_acc = accuracy(result, p["backend"], p["precision"])
        transfers = (f"{p['speedup_with_transfers']:.2f}x" if p.get("speedup_with_transfers")
                     else "n/a (CPU)" if not p.get("models", {}).get("dense", {}).get("with_transfers") else "—")
        iqr = p.get("speedup_iqr")
        spread = f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else ""
        lines.append(
            f"| {p['backend']} | {p['batch']} | {p['precision']} | {p.get('format') or '—'} | "
            f"{_pair(sizes.get('dense'), sizes.get('pruned'), _mb)} | {_pair(dense_acc, pruned_acc, _pct)} | "
            f"{_pair(d['median_ms'], q['median_ms'], _ms)} | {_pair(d['p99_ms'], q['p99_ms'], _ms)} | "
            f"{d['throughput']:.0f} → {q['throughput']:.0f} | {p['speedup']:.2f}x{spread} | "
            f"{result['mac_speedup']:.2f}x | {transfers} | {'on' if p.get('cuda_graphs') else 'off'} |")
    lines += ["", "Cells with an arrow are dense → pruned. Measured speedup: median of the per-round "
              "dense/pruned ratios (interquartile range in brackets). size: the file the backend runs "
              "(the fp32 checkpoint for eager and compile). top-1: the run's full test set, where "
              "metrics.json or export.json has it for this backend and precision.", "",
              "## Build and compile costs", "",
              "| backend | precision | batch | build s (dense / pruned) | first call ms (dense / pruned) | "
              "point s | rounds |", "|---|---|---|---|---|---|---|"]
    for p in points:
        b, f = p.get("build_seconds") or {}, p.get("first_call_ms") or {}
        show = lambda v, fmt: "—" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {p['backend']} | {p['precision']} | {p['batch']} | {show(b.get('dense'), '.1f')} / "
                     f"{show(b.get('pruned'), '.1f')} | "
                     f"{show(f.get('dense'), '.1f')} / {show(f.get('pruned'), '.1f')} | "
                     f"{p.get('seconds', 0):.1f} | {p.get('rounds', '—')} |")
    lines.append("")
    lines.append("Build: the export or ahead-of-time compile, once per backend and precision (eager and "
                 "torch.compile have none; torch.compile compiles in its first call at each batch size).")
    failed = [p for p in points if p["status"] != "ok"]
    if failed:
        lines += ["", "## Points without a result", ""]
        lines += [f"- {p['backend']} {p['precision']} batch {p['batch']}: {p['status']}: {p.get('error', '')}"
                  for p in failed]
    return "\n".join(lines) + "\n"


def goals(result: dict, batch: int = 256, precision: str = "fp16", min_speedup: float = 3.4,
          max_latency_ms: float = 0.15) -> list[str]:
    """Markdown lines checking the deployment goals: >= ``min_speedup`` throughput at ``batch`` in
    ``precision`` (best backend), pruned batch-1 p50 latency <= ``max_latency_ms`` (best backend and
    precision), and the pruned model never slower than the dense one."""
    ok = [p for p in result.get("points") or [] if p["status"] == "ok"]
    mark = lambda good: "PASS" if good else "FAIL"  # noqa: E731
    lines = []
    at = [p for p in ok if p["batch"] == batch and p["precision"] == precision]
    if at:
        best = max(at, key=lambda p: p["speedup"])
        lines.append(f"- {mark(best['speedup'] >= min_speedup)}: throughput speedup at batch {batch} ({precision}) "
                     f">= {min_speedup}x: best {best['speedup']:.2f}x ({best['backend']}); "
                     + ", ".join(f"{p['backend']} {p['speedup']:.2f}x" for p in at))
    else:
        lines.append(f"- NOT MEASURED: throughput speedup at batch {batch} ({precision}) >= {min_speedup}x")
    ones = [p for p in ok if p["batch"] == 1]
    if ones:
        best = min(ones, key=lambda p: p["models"]["pruned"]["compute"]["median_ms"])
        ms = best["models"]["pruned"]["compute"]["median_ms"]
        lines.append(f"- {mark(ms <= max_latency_ms)}: pruned batch-1 latency <= {max_latency_ms} ms: best "
                     f"{ms:.3f} ms ({best['backend']} {best['precision']})")
    else:
        lines.append(f"- NOT MEASURED: pruned batch-1 latency <= {max_latency_ms} ms")
    slower = [p for p in ok if p["speedup"] < 1.0]
    lines.append(f"- {mark(not slower)}: pruned never slower than dense ({len(ok)} points"
                 + (": slower at " + ", ".join(f"{p['backend']} {p['precision']} batch {p['batch']} "
                                               f"{p['speedup']:.2f}x" for p in slower) if slower else "") + ")")
    return lines


def plots(result: dict, run_dir) -> list[Path]:
    """bench-speedup.png (measured vs MAC speedup) and bench-latency.png (latency vs batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({(s["backend"], s["precision"]) for s in result["speedups"]})
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for b, prec in backends:
        pts = sorted((s["batch"], s["speedup"]) for s in result["speedups"]
                     if (s["backend"], s["precision"]) == (b, prec))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{b} {prec}")
    ax.axhline(result["mac_speedup"], color="k", linestyle="--", label=f"MAC ratio {result['mac_speedup']:.2f}x")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(xscale="log", xlabel="batch size", ylabel="speedup of pruned over dense",
           title=f"{result['model']}: measured vs MAC speedup\n{result['device']}")
    ax.legend(fontsize=8)
    paths.append(_save(fig, run_dir.bench_speedup_png))
    fig, ax = plt.subplots(figsize=(6, 4))
    for b, prec in backends:
        for model, style in (("dense", "-"), ("pruned", "--")):
            pts = sorted((r["batch"], r["compute"]["median_ms"]) for r in result["rows"]
                         if (r["backend"], r["precision"]) == (b, prec) and r["model"] == model)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{b} {prec} {model}")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median latency (ms)",
           title=f"{result['model']}: latency vs batch\n{result['device']}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    paths.append(_save(fig, run_dir.bench_latency_png))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
