"""bench.json -> a Markdown table and two plots a person can read."""
from __future__ import annotations

from pathlib import Path

from ..files import atomic_path


def speedups(rows: list[dict]) -> list[dict]:
    """Measured dense/pruned speedup per backend and batch, on median compute latency."""
    by_key = {(r["backend"], r["batch"], r["model"]): r for r in rows}
    out = []
    for (backend, batch, model), r in by_key.items():
        if model != "dense" or (backend, batch, "pruned") not in by_key:
            continue
        p = by_key[(backend, batch, "pruned")]
        entry = {"backend": backend, "batch": batch,
                 "speedup": r["compute"]["median_ms"] / p["compute"]["median_ms"]}
        if "with_transfers" in r:
            entry["speedup_with_transfers"] = r["with_transfers"]["median_ms"] / p["with_transfers"]["median_ms"]
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    rows = {(r["backend"], r["batch"], r["model"]): r for r in result["rows"]}
    acc = result.get("accuracy") or {}
    lines = [
        f"# Benchmark: {result['model']} ({result['dataset']}), {result['precision']}",
        "",
        f"- device: {result['device']}",
        f"- command: `{' '.join(result['command'] or [])}`",
        f"- date: {result['date']}; commit: {result['versions'].get('commit')}; torch {result['versions'].get('torch')}",
        f"- MACs: dense {result['macs']['dense'] / 1e6:.2f} M, pruned {result['macs']['pruned'] / 1e6:.2f} M "
        f"(MAC speedup {result['mac_speedup']:.2f}x); params {result['params']['dense'] / 1e6:.3f} M -> "
        f"{result['params']['pruned'] / 1e6:.3f} M",
    ]
    if acc:
        lines.append(f"- test accuracy: dense {acc['dense']['test']:.2%}, pruned + fine-tuned {acc['finetuned']['test']:.2%}")
    lines.append(f"- timing: {result['timing']['clock']}, median of >= {result['timing']['min_iters']} calls "
                 f"after {result['timing']['warmup']} warm-up calls")
    lines += ["", "| backend | batch | dense median ms | pruned median ms | measured speedup | MAC speedup | "
                  "dense p99 ms | pruned p99 ms | dense img/s | pruned img/s | speedup with transfers |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["speedups"]:
        d, p = rows[(s["backend"], s["batch"], "dense")], rows[(s["backend"], s["batch"], "pruned")]
        transfers = f"{s['speedup_with_transfers']:.2f}x" if "speedup_with_transfers" in s else "n/a (CPU)"
        lines.append(
            f"| {s['backend']} | {s['batch']} | {d['compute']['median_ms']:.3f} | {p['compute']['median_ms']:.3f} | "
            f"{s['speedup']:.2f}x | {result['mac_speedup']:.2f}x | {d['compute']['p99_ms']:.3f} | "
            f"{p['compute']['p99_ms']:.3f} | {d['compute']['throughput']:.0f} | {p['compute']['throughput']:.0f} | "
            f"{transfers} |")
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: Path) -> list[Path]:
    """bench-speedup.png (measured vs MAC speedup) and bench-latency.png (latency vs batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({s["backend"] for s in result["speedups"]})
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in backends:
        pts = sorted((s["batch"], s["speedup"]) for s in result["speedups"] if s["backend"] == b)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=b)
    ax.axhline(result["mac_speedup"], color="k", linestyle="--", label=f"MAC ratio {result['mac_speedup']:.2f}x")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(xscale="log", xlabel="batch size", ylabel="speedup of pruned over dense",
           title=f"{result['model']}: measured vs MAC speedup\n{result['device']}")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "bench-speedup.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in backends:
        for model, style in (("dense", "-"), ("pruned", "--")):
            pts = sorted((r["batch"], r["compute"]["median_ms"]) for r in result["rows"]
                         if r["backend"] == b and r["model"] == model)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{b} {model}")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median latency (ms)",
           title=f"{result['model']}: latency vs batch\n{result['device']}")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out_dir / "bench-latency.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
