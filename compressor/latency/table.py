"""The lookup table: each prunable layer timed alone at a grid of (input, output) channel counts.

*The grid* is each group's own. With ``--latency-step S``: its allowed widths on multiples of
S, made finer where a group would have fewer than :data:`MIN_POINTS` widths, plus the full
width. By default (no step) it is found in two passes: a coarse grid of :data:`COARSE` widths
spread over the allowed ones, then, for :data:`REFINE_ROUNDS` rounds, the allowed width halfway
into each interval across which the group's own layers (at full input) change their latency by
more than twice an interval's share (a step in the backend's kernels), or run faster at the
wider width. Between grid points (a layer after a concatenation or a flatten) the table
interpolates bilinearly.

*The cache* holds points, not tables: one JSON file per layer signature (op, shapes, followers)
and setting (backend, batch, precision, threads, timed calls, cold caches), in
:func:`~compressor.latency.spec.cache_dir`, mapping ``"cin,cout"`` to ms. Models and runs that
share a layer shape share its measurements, and a file is written after each layer, so an
interrupted table keeps what it measured. The file also records where and with what it was
measured (device name, library versions); a file whose record differs is never used: its
points are measured again, with a message saying what changed, and the file replaced.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..budget import allowed_widths
from ..files import write_json
from ..provenance import device_name
from .layers import LayerSpec, build_layer
from .spec import LatencySpec, cache_dir, split
from .timing import Timer

MIN_POINTS = 4  # a group's grid has at least this many widths (where it has as many legal ones)
COARSE = 6  # widths per group in an automatic grid's first pass (the full width included)
REFINE_ROUNDS = 2  # an automatic grid's refinement rounds
TABLE_VERSION = 3  # 2: medians through the bench's backends, cached per layer signature; 3: ORT without spinning


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


def coarse_grid(allowed: list[int], full: int, n: int = COARSE) -> list[int]:
    """``n`` of the allowed widths, evenly spread by rank, the smallest and the full one included."""
    widths = sorted(set(allowed) | {full})
    if len(widths) <= n:
        return widths
    return sorted({widths[round(k * (len(widths) - 1) / (n - 1))] for k in range(n)})


def refine(grid: list[int], allowed: list[int], ms: dict[int, float]) -> list[int]:
    """``grid`` plus the allowed width halfway (by rank) into each interval where the latency ``ms`` (per
    width of ``grid``) steps: it changes by more than twice an interval's share of the whole range, or
    falls as the width grows."""
    widths = sorted(grid)
    if len(widths) < 2:
        return widths
    share = abs(ms[widths[-1]] - ms[widths[0]]) / (len(widths) - 1)
    added = set()
    for a, b in zip(widths, widths[1:]):
        jump = ms[b] - ms[a]
        if jump > 2 * share or jump < 0:
            between = sorted(w for w in allowed if a < w < b)
            if between:
                added.add(between[len(between) // 2])
    return sorted(set(widths) | added)


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
    paths: list[str] = field(default_factory=list)  # the cache files its points are in
    measured: bool = False  # some point was measured in this process (False: all read from the cache)
    seconds: float = 0.0
    points: dict = field(default_factory=dict)  # {"measured": n, "cached": n}

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


class PointCache:
    """Measured points per layer signature: a JSON file each, read once, written after each layer."""

    def __init__(self, spec: LatencySpec, device: torch.device, cold: bool):
        self.spec, self.cold = spec, cold
        self.backend = f"{spec.bench_backend}-{device.type}"  # ort and ort-cpu: one setting, one file
        self.folder = cache_dir(spec.cache_dir)
        self.where = {"device": device_name(device), "versions": library_versions(spec.backend)}
        self.files: dict[str, dict] = {}  # path -> {"key": ..., "points": {...}}
        self.dirty: set[str] = set()

    def key(self, layer: LayerSpec) -> dict:
        s = self.spec
        what = {"version": TABLE_VERSION, "backend": self.backend, "batch": s.batch, "precision": s.precision,
                "threads": s.threads, "iters": s.table_iters, "cold_caches": self.cold, "layer": layer.shape_key()}
        return {"what": what, "where": self.where}

    def path(self, layer: LayerSpec) -> str:
        s = self.spec
        return str(self.folder / f"{self.backend}-b{s.batch}-{s.precision}-{_digest(self.key(layer)['what'])}.json")

    def points(self, layer: LayerSpec) -> dict[str, float]:
        path = self.path(layer)
        if path not in self.files:
            key = self.key(layer)
            self.files[path] = {"key": key, "points": self._read(Path(path), key, layer.name)}
        return self.files[path]["points"]

    def _read(self, path: Path, key: dict, name: str) -> dict[str, float]:
        if not path.is_file():
            return {}
        try:
            saved = json.loads(path.read_text())
            stored = saved.get("key") if isinstance(saved, dict) else None
        except (OSError, ValueError) as exc:
            self.spec.log(f"cached points {path} are unreadable ({exc}); measuring {name} again")
            return {}
        points = saved.get("points") if isinstance(saved, dict) else None
        if stored == key and isinstance(points, dict) and all(isinstance(v, (int, float)) for v in points.values()):
            return dict(points)
        changes = "; ".join(_diff(stored, key)[:6]) if isinstance(stored, dict) else "format"
        self.spec.log(f"cached points {path} were measured for another setting ({changes or 'format'}); measuring "
                      f"{name} again")
        return {}

    def save(self) -> None:
        for path in sorted(self.dirty):
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                write_json(Path(path), self.files[path] | {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            except OSError as exc:
                self.spec.log(f"could not cache points at {path} ({exc})")
        self.dirty.clear()


class Measurer:
    """Table points: from the cache, else timed (and cached), with progress and an ETA."""

    def __init__(self, spec: LatencySpec, device: torch.device, timer: Timer | None, cold: bool):
        self.spec, self.cold = spec, cold
        self.timer = timer or Timer(spec, device)
        self.cache = PointCache(spec, device, cold)
        self.measured = self.cached = 0
        self.seconds = 0.0

    def missing(self, layer: LayerSpec, pairs) -> int:
        have = self.cache.points(layer)
        return sum(1 for cin, cout in pairs if f"{cin},{cout}" not in have)

    def ms(self, layer: LayerSpec, cin: int, cout: int) -> float:
        have = self.cache.points(layer)
        key = f"{cin},{cout}"
        if key in have:
            self.cached += 1
            return have[key]
        module, shape = build_layer(layer, cin or cout, cout)
        t0 = time.perf_counter()
        have[key] = self.timer.time_ms(self.timer.callable(module, shape), flush=self.cold)
        self.timer.release()
        self.seconds += time.perf_counter() - t0
        self.measured += 1
        self.cache.dirty.add(self.cache.path(layer))
        return have[key]

    def eta(self, left: int) -> str:
        if not self.measured or not left:
            return ""
        s = self.seconds / self.measured * left
        return f", {left} points left, about {int(s // 60)}:{int(s % 60):02d} to go"


def _axes(s: LayerSpec, grids, full) -> tuple[list[int], list[int]]:
    ins = [0] if s.depthwise else axis(s.in_groups, s.in_full, grids, full)
    return ins, axis(s.out_groups, s.out_full, grids, full)


def auto_grids(specs: list[LayerSpec], allowed: dict[str, list[int]], full: dict[str, int],
               measurer: Measurer) -> dict[str, list[int]]:
    """Each group's grid without ``--latency-step``: coarse, then refined where its layers' latency steps."""
    grids = {g: coarse_grid(allowed[g], full[g]) for g in full}
    owners = {g: [s for s in specs if s.out_groups == [g]] for g in full}  # the layers whose width g sets
    for r in range(REFINE_ROUNDS):
        changed = False
        measurer.spec.log(f"grid, pass {r + 1} of {REFINE_ROUNDS}: timing each group's own layers at its widths")
        for g, layers in owners.items():
            if not layers:
                continue
            ms = {}
            for w in grids[g]:
                total = 0.0
                for s in layers:
                    cout = max(1, round(s.out_full * w / full[g]))
                    total += measurer.ms(s, 0 if s.depthwise else s.in_full, cout)
                ms[w] = total
            measurer.cache.save()  # an interrupted grid keeps what it timed
            finer = refine(grids[g], allowed[g], ms)
            changed |= finer != grids[g]
            grids[g] = finer
        if not changed:
            break
    return grids


def load_or_measure(specs: list[LayerSpec], full: dict[str, int], spec: LatencySpec, device: torch.device,
                    timer: Timer | None = None, cold: bool = False, grids: dict[str, list[int]] | None = None,
                    allowed: dict[str, list[int]] | None = None) -> LatencyTable:
    """The table for these layers on this backend, at ``grids`` (or, given each group's ``allowed`` widths
    instead, at :func:`auto_grids`), every point from the cache or timed (``cold``: with flushed caches)."""
    measurer = Measurer(spec, device, timer, cold)
    t0 = time.perf_counter()
    if grids is None:
        grids = auto_grids(specs, allowed, full, measurer)
    axes = {s.name: _axes(s, grids, full) for s in specs}
    left = sum(measurer.missing(s, [(i, o) for i in axes[s.name][0] for o in axes[s.name][1]]) for s in specs)
    if left:
        spec.log(f"timing {left} table points on {spec.backend} at batch {spec.batch} "
                 f"({sum(len(i) * len(o) for i, o in axes.values())} in all; the rest are cached in "
                 f"{measurer.cache.folder})")
    layers = {}
    for s in specs:
        ins, outs = axes[s.name]
        before = measurer.measured
        ms = [[measurer.ms(s, cin, cout) for cout in outs] for cin in ins]
        measurer.cache.save()
        left -= measurer.measured - before
        if s.depthwise:
            ins = [max(outs)]
        layers[s.name] = {"in": ins, "out": outs, "ms": ms, "depthwise": s.depthwise}
        if measurer.measured > before:
            spec.log(f"  {s.name}: {len(ins)}x{len(outs)} points, {ms[-1][-1]:.4f} ms at full width"
                     f"{measurer.eta(left)}")
    key = {"layers": {s.name: measurer.cache.path(s) for s in specs}, "grids": grids}
    paths = sorted(set(key["layers"].values()))
    table = LatencyTable(key, layers, paths, measured=measurer.measured > 0, seconds=time.perf_counter() - t0,
                         points={"measured": measurer.measured, "cached": measurer.cached})
    if table.measured:
        spec.log(f"table: {table.points['measured']} points timed in {table.seconds:.1f}s, "
                 f"{table.points['cached']} from the cache ({measurer.cache.folder})")
    else:
        spec.log(f"table from cache ({len(paths)} files in {measurer.cache.folder})")
    return table
