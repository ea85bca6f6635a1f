"""``compress bench RUN_DIR``: time the run's dense and pruned models on each backend.

A *point* is one backend x precision x batch size, where the dense and the pruned model
are timed interleaved (:func:`compressor.bench.harness.interleave`). Each finished point is
appended to ``RUN_DIR/bench.jsonl`` at once (one JSON line, flushed and fsynced) and a
progress line is printed, so a killed bench keeps every finished point; ``--resume``
continues from there, skipping those points (the file's first line holds the settings the
numbers depend on, and a resume with other settings is refused). ``bench.json``,
``bench.md`` and the plots are written, atomically, from all the points at the end.

Each build (export, AOTI compile) and each point's timing is capped at ``--point-seconds``;
one that runs past it is recorded as timed out (and not retried by ``--resume``). A point
that fails is recorded with its error (``--resume`` tries it again). ``--total-seconds``
bounds a whole invocation: points it leaves undone are not recorded, and ``--resume``
does them next time.

The builds and the timings run in a worker process (:class:`compressor.bench.worker.Worker`: a fresh interpreter
started once per bench, that loads the two checkpoints itself and holds one backend's builds
at a time). A build or a point that passes its cap is ended by killing the worker, which is
started again (and builds that backend again) for the points after; this process only waits,
so a timeout cannot leave it half-way through torch code (an exception raised into it by a
timer once left autograd off for the rest of the process). The timing loop also stops itself
at the cap (``interleave(max_seconds=...)``) and keeps what it measured; the kill, a little
later, is for a build or a call that never returns. A crash of the worker (a segfault in a
runtime) is recorded as that point's error. CUDA runs in the worker as well: it has its own
context, and killing it frees what it held (this process empties its own cache first, so memory
that `compress run --bench` trained with is not held beside it). The worker costs a second or
two per bench (importing torch, overlapped with this process's loading) and again after each
kill. A backend the worker cannot import (one registered inside a function, as a test does) is
built and timed in this process, where only the timing loop's own cap applies.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import checkpoint, surgery
from ..artifacts import sha256
from ..errors import CompressorError
from ..files import failpoint, write_json, write_text
from ..provenance import device_name, versions
from ..rundir import RunDir
from ..train import pick_device
from . import backends as B
from . import report
from . import worker as workers
from .config import BenchConfig

JSONL = RunDir("").bench_jsonl.name  # bench.jsonl
FORMAT = 2  # of bench.jsonl; a file of another format is refused on --resume

MODELS = ("dense", "pruned")
_clock = time.perf_counter  # every cap and every point's seconds


def _checkpoint(run_dir: RunDir, model: str) -> Path:
    """The run's checkpoint of ``model`` (dense or pruned)."""
    return {"dense": run_dir.dense, "pruned": run_dir.pruned}[model]


def _artifacts(run_dir: RunDir) -> Path:
    """Where the backends' builds (ONNX files, AOTI packages, engines) go."""
    return run_dir.bench_artifacts


def _key(point: dict) -> tuple:
    return point["backend"], point["precision"], point["batch"]


class Journal:
    """``bench.jsonl``: a settings line, then one line per finished point, each flushed and fsynced."""

    def __init__(self, path: Path, settings: dict, resume: bool, overwrite: bool, argv: list[str] | None):
        self.path = path
        self.points: dict[tuple, dict] = {}
        if path.exists() and not (resume or overwrite) and self.read(path)[1]:
            raise CompressorError(f"{path} holds points of an earlier bench; pass --resume to continue it "
                                  f"or --overwrite to start afresh")
        if path.exists() and resume and not overwrite:
            header, points = self.read(path)
            if header is None:
                raise CompressorError(f"{path} has no settings line; pass --overwrite to start afresh")
            saved = header.get("settings", {})
            saved = saved if isinstance(saved, dict) else {"settings": saved}
            diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
            if header.get("format") != FORMAT or diff:
                shown = "; ".join(f"{k}: {saved.get(k)!r} there, {settings.get(k)!r} now" for k in diff)
                raise CompressorError(f"{path} was written with other settings ({shown or 'another file format'}); "
                                      f"--resume needs the same ones, or pass --overwrite to start afresh")
            self.points = {_key(p): p for p in points}
            self._truncate_partial_line()
            self.file = open(path, "a", encoding="utf-8")
        else:
            if resume and not path.exists():
                print(f"no {path.name} to resume in {path.parent}; starting afresh", flush=True)
            self.file = open(path, "w", encoding="utf-8")
            self._write({"type": "settings", "format": FORMAT, "settings": settings, "command": argv,
                         "started": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    @staticmethod
    def read(path: Path) -> tuple[dict | None, list[dict]]:
        """(settings line, points) of a bench.jsonl; a half-written last line (a kill) is ignored."""
        header, points = None, []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(entry, dict):
                continue  # not a line this journal writes
            if entry.get("type") == "settings" and header is None:
                header = entry
            elif entry.get("type") == "point" and all(isinstance(entry.get(k), (str, int)) and
                                                      not isinstance(entry.get(k), bool)
                                                      for k in ("backend", "precision", "batch")):
                points.append(entry)  # a point without its key fields is not one of ours: timed again
        return header, points

    def _truncate_partial_line(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def _write(self, entry: dict) -> None:
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def append(self, point: dict) -> None:
        self._write(point)
        self.points[_key(point)] = point

    def done(self, key: tuple) -> bool:
        """Finished or timed out: not done again. A point that failed is tried again."""
        return key in self.points and self.points[key]["status"] in ("ok", "timed_out")

    def close(self) -> None:
        self.file.close()


def bench(run_dir: str | Path, config: BenchConfig | None = None, *, device: str = "auto", resume: bool = False,
          overwrite: bool = False, argv: list[str] | None = None, trusted_factories=(), **overrides) -> dict:
    """Benchmark a run's dense and pruned models; returns what ``bench.json`` holds.

    The settings are ``config`` (:class:`BenchConfig`, default its defaults) with any of its fields
    given as keywords on top (``bench(run, backends="eager,ort", batch_sizes="1,8")``), checked
    before anything is read. ``resume`` continues the ``bench.jsonl`` of an interrupted bench (same
    settings), ``overwrite`` replaces it; ``argv`` is recorded as the command. ``trusted_factories``:
    model factories the checkpoints may name beyond the registry and torchvision.
    """
    config = BenchConfig.given(config, **overrides)
    run_dir = RunDir(run_dir)
    checkpoints = {name: _checkpoint(run_dir, name) for name in MODELS}
    for name, path in checkpoints.items():
        if not path.is_file():
            raise CompressorError(f"{run_dir} is not a finished run directory: {path.name} is missing")
    dev = pick_device(device)
    names, precisions = config.resolve(dev)  # int8 needs a backend that runs it
    invocation_started = _clock()
    settings = {"device": device_name(dev), "warmup": config.warmup, "min_iters": config.min_iters,
                "min_seconds": config.min_seconds, "rounds": config.rounds, "compile_mode": config.compile_mode,
                "checkpoints": {name: sha256(path) for name, path in checkpoints.items()}}
    journal = Journal(run_dir.bench_jsonl, settings, resume, overwrite, argv)
    sizes = list(config.batch_sizes)
    plan = [(b, p, n) for b in names for p in precisions if B.applies(b, p) for n in sizes]
    todo = [k for k in plan if not journal.done(k)]
    if len(todo) < len(plan):
        print(f"resuming: {len(plan) - len(todo)} of {len(plan)} points already in {journal.path}", flush=True)
    left_undone = 0
    point_seconds, total_seconds = config.point_seconds, config.total_seconds

    def remaining() -> float | None:
        return None if total_seconds is None else total_seconds - (_clock() - invocation_started)

    def spent() -> bool:
        left = remaining()
        return left is not None and left <= 0

    def cap() -> float:
        left = remaining()
        return point_seconds if left is None else min(point_seconds, left)

    portable = [b for b in names if workers.portable(B.BACKENDS.get(b))]
    worker = None
    if any(k[0] in portable for k in todo):  # started now: it imports torch while this process loads the models
        if dev.type == "cuda" and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # what this process trained with is the worker's now
        worker = workers.Worker(checkpoints, trusted_factories, dev, [B.BACKENDS.get(b) for b in portable])
    try:
        if worker is not None:
            worker.launch()
        loaded = {name: checkpoint.load(path, with_spec=True, trusted_factories=trusted_factories)
                  for name, path in checkpoints.items()}
        spec = loaded["dense"][1]
        example = spec.example_inputs()
        costs = {name: surgery.count(model, example) for name, (model, _) in loaded.items()}
        here = workers.InProcess(workers.Work(loaded, checkpoints, dev))
        for backend in names:
            runner = worker if backend in portable else here
            for prec in precisions:
                keys = [k for k in todo if k[0] == backend and k[1] == prec]
                if not keys:
                    continue
                if spent():
                    left_undone += len(keys)
                    continue
                failure = None
                for i, key in enumerate(keys):
                    if spent():  # the budget ran out: no worker is started only to time out
                        left_undone += len(keys) - i
                        break
                    if failure is None and runner.group != (backend, prec):  # first, or after a kill: build
                        failure, limit = _build(runner, backend, prec, cap, _artifacts(run_dir), max(sizes),
                                                config.compile_mode)
                        if failure and failure[0] == "timed_out" and limit < point_seconds:  # the budget ran out
                            left_undone += len(keys) - i
                            break
                    if failure:
                        point = {"type": "point", "backend": backend, "precision": prec, "batch": key[2],
                                 "status": failure[0], "error": failure[1], "seconds": failure[2]}
                    else:
                        if spent():
                            left_undone += 1
                            continue
                        point = _time_point(key, runner, config, cap())
                        if point is None:  # the total budget ran out inside it
                            left_undone += 1
                            continue
                    point |= {"macs": {n: costs[n].macs for n in MODELS},
                              "params": {n: costs[n].params for n in MODELS}}
                    journal.append(point)
                    _progress(point, sum(k in journal.points for k in plan), len(plan))
                    failpoint("bench-point")  # tests: a kill right after a point has landed
                runner.release(backend, point_seconds)  # the builds, and torch.compile's graphs
    finally:
        journal.close()
        if worker is not None:
            worker.close()
    if left_undone:
        print(f"--total-seconds spent: {left_undone} point(s) left undone; run again with --resume to do them",
              flush=True)
    header, points = Journal.read(journal.path)
    points = list({_key(p): p for p in points}.values())  # a point tried again replaces its failure
    result = _result(run_dir, header, points, spec, costs, dev, argv, settings, point_seconds)
    result["complete"] = left_undone == 0
    write_json(run_dir.bench_json, result)
    write_text(run_dir.bench_md, report.markdown(result))
    report.plots(result, run_dir)
    print(report.markdown(result))
    return result


def _build(runner, backend: str, prec: str, cap, workdir: Path, max_batch: int, compile_mode: str):
    """Build ``backend``'s dense and pruned models in ``runner``, each within ``cap()`` seconds:
    ``(None, cap)``, or ``((status, error, seconds), the cap it had)`` for the first that failed."""
    runner.builds = {}
    limit = cap()
    for name in MODELS:
        limit = cap()
        started = _clock()
        try:
            runner.builds[name] = runner.call("build", (backend, prec, name, workdir, max_batch, compile_mode),
                                              limit)
        except workers.TimedOut:
            return ("timed_out", f"building {name} took over {limit:.0f} s", _clock() - started), limit
        except Exception as exc:  # noqa: BLE001 - one backend's failure must not lose the others
            return ("error", f"building {name}: {workers.describe(exc)}", _clock() - started), limit
    runner.group = (backend, prec)
    return None, limit


def _time_point(key, runner, config: BenchConfig, limit: float) -> dict | None:
    """Time one point on the models ``runner`` built; None when the total budget (not the point's own
    cap) ran out inside it."""
    backend, prec, batch = key
    started = _clock()
    builds = runner.builds
    point = {"type": "point", "backend": backend, "precision": prec, "batch": batch,
             "cuda_graphs": builds["dense"]["cuda_graphs"], "note": builds["dense"]["note"],
             "build_seconds": {n: b["seconds"] for n, b in builds.items()}, "format": builds["dense"]["format"],
             "artifact_bytes": {n: b["artifact_bytes"] for n, b in builds.items()}}
    try:
        # the loop stops itself at the limit and keeps what it measured; the kill, a little later, ends a hang
        timed = runner.call("time", (backend, batch, config.warmup, config.rounds, config.min_iters,
                                     config.min_seconds, limit), limit + min(10.0, 0.2 * limit))
    except workers.TimedOut:
        if limit < config.point_seconds:
            return None
        return point | {"status": "timed_out", "error": f"no result within {limit:.0f} s",
                        "seconds": _clock() - started}
    except Exception as exc:  # noqa: BLE001 - recorded, and the other points go on
        return point | {"status": "error", "error": workers.describe(exc), "seconds": _clock() - started}
    il = timed["interleaved"]
    if il["timed_out"] and limit < config.point_seconds:
        return None
    point |= {"status": "timed_out" if il["timed_out"] else "ok", "seconds": _clock() - started,
              "first_call_ms": il["first_call_ms"], "rounds": il["rounds"], "burst": il["burst"],
              "speedup": il["speedup"]["pruned"], "speedup_iqr": il["speedup_iqr"]["pruned"],
              "round_ratios": il["ratios"]["pruned"],
              "models": {n: m for n, m in timed["models"].items() if "compute" in m}}
    if il["timed_out"]:
        point["error"] = f"timing stopped at {limit:.0f} s after {il['rounds']} round(s)"
    if all("compute" in timed["models"][n] for n in MODELS):
        point["speedup_of_medians"] = (timed["models"]["dense"]["compute"]["median_ms"]
                                       / timed["models"]["pruned"]["compute"]["median_ms"])
    if "interleaved_with_transfers" in timed:
        point["speedup_with_transfers"] = timed["interleaved_with_transfers"]["speedup"]["pruned"]
    return point


def _progress(point: dict, done: int, total: int) -> None:
    head = f"[{done}/{total}] {point['backend']:8s} {point['precision']:5s} batch {point['batch']:5d}:"
    if point["status"] != "ok" and len(point.get("models") or {}) < len(MODELS):
        print(f"{head} {point['status']}: {point.get('error', '')}", flush=True)
        return
    m = point["models"]
    build = point.get("build_seconds") or {}
    first = point.get("first_call_ms") or {}
    speedup = f"{point['speedup']:.2f}x" if point.get("speedup") else "n/a"
    print(f"{head} p50 dense {m['dense']['compute']['median_ms']:.3f} ms, pruned "
          f"{m['pruned']['compute']['median_ms']:.3f} ms; speedup {speedup} (median of {point['rounds']} rounds); "
          f"build {sum(build.values()):.1f} s, first call {max(first.values(), default=0):.0f} ms"
          f"{'; TIMED OUT' if point['status'] == 'timed_out' else ''}", flush=True)


def _accuracy_sources(run_dir: RunDir) -> dict:
    """metrics.json's accuracy and export.json's per-format entries, read defensively."""
    found: dict = {}
    for name, path in (("metrics", run_dir.metrics), ("export", run_dir.export_json)):
        try:
            found[name] = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            found[name] = {}
    return found


def _result(run_dir, header, points, spec, costs, dev, argv, settings, point_seconds) -> dict:
    rows = []
    for p in points:
        if p["status"] != "ok":
            continue
        for name in MODELS:
            stats = p["models"][name]
            rows.append({"backend": p["backend"], "model": name, "batch": p["batch"], "precision": p["precision"],
                         "cuda_graphs": p.get("cuda_graphs"), "note": p.get("note", ""),
                         "build_seconds": (p.get("build_seconds") or {}).get(name),
                         "first_call_ms": (p.get("first_call_ms") or {}).get(name), **stats,
                         "macs": costs[name].macs, "params": costs[name].params})
    sources = _accuracy_sources(run_dir)
    return {
        "command": argv,
        "first_command": (header or {}).get("command"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "started": (header or {}).get("started"),
        "device": device_name(dev),
        "versions": versions(),
        "run_dir": str(run_dir),
        "model": spec.model,
        "dataset": spec.dataset,
        "precisions": sorted({p["precision"] for p in points}, key=B.PRECISIONS.index),
        "timing": {"warmup": settings["warmup"], "min_iters": settings["min_iters"],
                   "min_seconds": settings["min_seconds"], "rounds": settings["rounds"],
                   "compile_mode": settings["compile_mode"], "point_seconds": point_seconds,
                   "clock": "CUDA events" if dev.type == "cuda" else "perf_counter",
                   "method": "interleaved: dense and pruned alternate in short bursts; speedup = median of "
                             "the per-round ratios"},
        "accuracy": sources["metrics"].get("accuracy"),
        "export": {k: v for k, v in sources["export"].items() if isinstance(v, dict)},
        "macs": {n: c.macs for n, c in costs.items()},
        "params": {n: c.params for n, c in costs.items()},
        "mac_speedup": costs["dense"].macs / costs["pruned"].macs,
        "points": points,
        "rows": rows,
        "speedups": report.speedups(points),
    }
