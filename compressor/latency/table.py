"""The lookup table: each prunable layer timed alone at a grid of (input, output) channel counts.

*The grid* is each group's own: its allowed widths on multiples of ``step`` (default: the
solver's ``round_to``), made finer where a group would have fewer than :data:`MIN_POINTS`
widths, plus the full width. Between grid points (a layer after a concatenation or a flatten)
the table interpolates bilinearly.

*The cache*: tables are JSON files in :func:`~compressor.latency.spec.cache_dir`. The file name
is a hash of what is measured (layer shapes, grid, backend, batch, precision, threads); the file
holds the full key, which adds where and with what it was measured (device name, library
versions). A file whose key differs is never used: the table is measured again, with a message
saying what changed, and the file replaced.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import torch

from ..budget import allowed_widths
from ..files import write_json
from ..provenance import device_name
from .layers import LayerSpec, build_layer
from .spec import LatencySpec, cache_dir, split
from .timing import Timer

MIN_POINTS = 4  # a group's grid has at least this many widths (where it has as many legal ones)
TABLE_VERSION = 2  # 2: points are medians timed through the bench's backends


def group_grid(group, full: int, step: int, round_to: int, max_ratio: float) -> list[int]:
    """The widths of ``group`` the table measures (and the latency solver may choose): its allowed
    widths on multiples of ``step``, made finer (halving the step, not below round_to) where that leaves
    fewer than :data:`MIN_POINTS`, plus the full width."""
    allowed = allowed_widths(full, round_to, max_ratio, group)
    step = max(step, round_to)
    while True:
        grid = sorted({w for w in allowed if w % step == 0} | {full})
        if len(grid) >= min(MIN_POINTS, len(allowed)) or step <= round_to:
            return grid
        step = max(round_to, (step // 2) // round_to * round_to or round_to)


def axis(groups: list[str], full_ch: int, grids: dict[str, list[int]], full: dict[str, int]) -> list[int]:
    """Channel counts of a layer side driven by ``groups``, at the groups' grid points."""
    if not groups:
        return [full_ch]
    if len(groups) == 1:
        g = groups[0]
        return sorted({max(1, round(full_ch * w / full[g])) for w in grids[g]})
    total = sum(full[g] for g in groups)  # a concatenation: shares on the finest of its groups' grids
    n = max(len(grids[g]) for g in groups)
    least = sum(min(grids[g]) for g in groups) / total
    shares = [least + (1 - least) * k / (n - 1) for k in range(n)] if n > 1 else [1.0]
    return sorted({max(1, round(full_ch * s)) for s in shares})


@dataclass
class LatencyTable:
    """Per layer: ``in`` and ``out`` channel grids and ``ms[i][j]`` at (in[i], out[j])."""

    key: dict
    layers: dict[str, dict]
    path: str | None = None
    measured: bool = False  # measured in this process (False: read from the cache)
    seconds: float = 0.0

    def lookup(self, layer: str, cin: float, cout: float) -> float:
        entry = self.layers[layer]
        xs, ys, ms = entry["in"], entry["out"], entry["ms"]
        i0, i1, a = _bracket(xs, cin)
        j0, j1, b = _bracket(ys, cout)
        top = ms[i0][j0] * (1 - b) + ms[i0][j1] * b
        bottom = ms[i1][j0] * (1 - b) + ms[i1][j1] * b
        return top * (1 - a) + bottom * a


def _bracket(grid: list[int], v: float) -> tuple[int, int, float]:
    if v <= grid[0] or len(grid) == 1:
        return 0, 0, 0.0
    if v >= grid[-1]:
        n = len(grid) - 1
        return n, n, 0.0
    for k in range(len(grid) - 1):
        if grid[k] <= v <= grid[k + 1]:
            return k, k + 1, (v - grid[k]) / (grid[k + 1] - grid[k])
    return 0, 0, 0.0


def library_versions(backend: str) -> dict:
    """The versions a table's timings depend on: torch, the backend's runtime, CUDA where it runs."""
    from importlib.metadata import PackageNotFoundError, version

    from ..bench.backends import BACKENDS

    found = {"torch": torch.__version__}
    for dist in BACKENDS.get(split(backend)[0]).info.get("runtime", ()):
        try:
            found[dist] = version(dist)
            break
        except PackageNotFoundError:
            continue
    if torch.cuda.is_available() and backend != "ort-cpu":
        found["cuda"] = torch.version.cuda
    return found


def table_key(specs: list[LayerSpec], grids: dict, spec: LatencySpec, device: torch.device,
              cold: bool = False) -> tuple[dict, dict]:
    """(what is measured, where and with what): the first names the cache file, both must match to reuse it."""
    what = {"version": TABLE_VERSION, "backend": spec.backend, "batch": spec.batch, "precision": spec.precision,
            "threads": spec.threads, "iters": spec.table_iters, "cold_caches": cold,
            "layers": [s.shape_key() for s in specs], "grids": grids}
    where = {"device": device_name(device), "versions": library_versions(spec.backend)}
    return what, where


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {json.dumps(a)[:60]} -> {json.dumps(b)[:60]}")
    return out


def _cached(path, key: dict, spec: LatencySpec) -> LatencyTable | None:
    """The table at ``path`` when its key is ``key``; else None, saying why."""
    if not path.is_file():
        spec.log(f"no cached table for this model/backend/batch/precision in {path.parent}; measuring")
        return None
    try:
        saved = json.loads(path.read_text())
        stored = saved.get("key") if isinstance(saved, dict) else None
    except (OSError, ValueError) as exc:
        spec.log(f"cached table {path} is unreadable ({exc}); measuring again")
        return None
    if stored == key and isinstance(saved.get("layers"), dict):
        spec.log(f"table from cache {path}")
        return LatencyTable(key, saved["layers"], str(path), measured=False)
    changes = "; ".join(_diff(stored, key)[:6]) if isinstance(stored, dict) else "format"
    spec.log(f"cached table {path} was measured for another setting ({changes or 'format'}); measuring again")
    return None


def load_or_measure(specs: list[LayerSpec], grids: dict[str, list[int]], full: dict[str, int], spec: LatencySpec,
                    device: torch.device, timer: Timer | None = None, cold: bool = False) -> LatencyTable:
    """The table for these layers on this backend: from the cache when its key matches, else measured
    (and written to the cache). ``cold``: each timed call starts with flushed caches."""
    what, where = table_key(specs, grids, spec, device, cold)
    key = {"what": what, "where": where}
    folder = cache_dir(spec.cache_dir)
    path = folder / f"{spec.backend}-b{spec.batch}-{spec.precision}-{_digest(what)}.json"
    found = _cached(path, key, spec)
    if found is not None:
        return found
    timer = timer or Timer(spec, device)
    t0 = time.perf_counter()
    layers = {}
    for s in specs:
        ins = [0] if s.depthwise else axis(s.in_groups, s.in_full, grids, full)
        outs = axis(s.out_groups, s.out_full, grids, full)
        ms = []
        for cin in ins:
            row = []
            for cout in outs:
                module, shape = build_layer(s, cin or cout, cout)
                row.append(timer.time_ms(timer.callable(module, shape), flush=cold))
            ms.append(row)
        if s.depthwise:
            ins = [max(outs)]
        layers[s.name] = {"in": ins, "out": outs, "ms": ms, "depthwise": s.depthwise}
        spec.log(f"  {s.name}: {len(ins)}x{len(outs)} points, {ms[-1][-1]:.4f} ms at full width")
    table = LatencyTable(key, layers, str(path), measured=True, seconds=time.perf_counter() - t0)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "layers": layers, "seconds": table.seconds,
                          "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        spec.log(f"table measured in {table.seconds:.1f}s, cached at {path}")
    except OSError as exc:
        spec.log(f"table measured in {table.seconds:.1f}s; could not cache it at {path} ({exc})")
    return table
