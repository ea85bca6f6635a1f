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
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint, surgery
from ..artifacts import sha256
from ..checks import number
from ..errors import CompressorError
from ..files import failpoint, write_json, write_text
from ..provenance import device_name, versions
from ..rundir import RunDir
from ..train import pick_device
from . import backends as B
from . import report
from .harness import PointTimeout, measure_pair

JSONL = RunDir("").bench_jsonl.name  # bench.jsonl
FORMAT = 2  # of bench.jsonl; a file of another format is refused on --resume

MODELS = ("dense", "pruned")


def parse_batch_sizes(text: str | list[int] | None) -> list[int]:
    """Batch sizes from "1,32" (or a list of whole numbers), each at least 1."""
    if text is not None and not isinstance(text, str):  # the API may pass a list
        sizes = list(text) if isinstance(text, (list, tuple)) else [text]
        for b in sizes:
            number("--batch-sizes", b, integer=True, low=1)
        if not sizes:
            raise CompressorError("--batch-sizes needs at least one batch size")
        return sizes
    try:
        sizes = [int(b) for b in (text or "1,32").split(",") if b.strip()]
    except ValueError:
        raise CompressorError(f"--batch-sizes takes whole numbers separated by commas, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise CompressorError(f"--batch-sizes must be positive, got {text!r}")
    return sizes


def check_options(batch_sizes: str | list[int] | None = None, warmup: int = 10, min_iters: int = 30,
                  min_seconds: float = 1.0, rounds: int = 10, compile_mode: str = "default",
                  point_seconds: float = 60.0, total_seconds: float | None = None) -> list[int]:
    """Refuse a bad benchmark number (NaN and inf too) with one clear error; returns the batch sizes.

    ``compress run --bench`` calls this before training, ``bench`` before loading anything.
    """
    number("--warmup", warmup, integer=True, low=0)
    number("--min-iters", min_iters, integer=True, low=1)
    number("--min-seconds", min_seconds, low=0)
    number("--rounds", rounds, integer=True, low=1)
    number("--point-seconds", point_seconds, low=0, low_open=True)
    number("--total-seconds", total_seconds, low=0, low_open=True, optional=True)
    B.check_compile_mode(compile_mode)
    return parse_batch_sizes(batch_sizes)


def _checkpoint(run_dir: RunDir, model: str) -> Path:
    """The run's checkpoint of ``model`` (dense or pruned)."""
    return {"dense": run_dir.dense, "pruned": run_dir.pruned}[model]


def _artifacts(run_dir: RunDir) -> Path:
    """Where the backends' builds (ONNX files, AOTI packages, engines) go."""
    return run_dir.bench_artifacts


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is our time cap, perhaps wrapped by the code it interrupted (Inductor wraps it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PointTimeout) or "PointTimeout" in str(exc).split("\n", 1)[0]:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _key(point: dict) -> tuple:
    return point["backend"], point["precision"], point["batch"]


@contextlib.contextmanager
def _alarm(seconds: float | None):
    """Raise :class:`PointTimeout` in this (main) thread after ``seconds``: the backstop for a build or
    first call (a compile) that never returns to the timing loop. Elsewhere, only the loop's own check.

    The exception lands between any two bytecodes, so it can cut a ``with torch.no_grad():`` after the
    grad mode was switched off but before its ``__exit__`` is armed; autograd would then stay off for the
    rest of the process (a later ``fit`` fails). The grad mode is therefore put back on the way out."""
    if seconds is None or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise PointTimeout(f"over {seconds:.0f} s")

    grad_enabled = torch.is_grad_enabled()
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        torch.set_grad_enabled(grad_enabled)


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


def bench(run_dir: str | Path, backends: str | None = None, batch_sizes: str | list[int] | None = None,
          precision: str | list[str] = "fp32", device: str = "auto", warmup: int = 10, min_iters: int = 30,
          min_seconds: float = 1.0, argv: list[str] | None = None, *, rounds: int = 10,
          compile_mode: str = "default", point_seconds: float = 60.0, total_seconds: float | None = None,
          resume: bool = False, overwrite: bool = False, trusted_factories=(),
          clock: Callable[[], float] = time.perf_counter) -> dict:
    """Benchmark a run's dense and pruned models; returns what ``bench.json`` holds.

    ``clock`` times the calls on a CPU (and every cap); tests pass a fake one.
    """
    sizes = check_options(batch_sizes, warmup, min_iters, min_seconds, rounds, compile_mode, point_seconds,
                          total_seconds)
    run_dir = RunDir(run_dir)
    checkpoints = {name: _checkpoint(run_dir, name) for name in MODELS}
    for name, path in checkpoints.items():
        if not path.is_file():
            raise CompressorError(f"{run_dir} is not a finished run directory: {path.name} is missing")
    dev = pick_device(device)
    precisions = B.check_precision(precision, dev)
    names = B.parse_backends(backends, dev, precisions)  # int8 needs a backend that runs it
    invocation_started = clock()
    settings = {"device": device_name(dev), "warmup": warmup, "min_iters": min_iters, "min_seconds": min_seconds,
                "rounds": rounds, "compile_mode": compile_mode,
                "checkpoints": {name: sha256(path) for name, path in checkpoints.items()}}
    journal = Journal(run_dir.bench_jsonl, settings, resume, overwrite, argv)
    loaded = {name: checkpoint.load(path, with_spec=True, trusted_factories=trusted_factories)
              for name, path in checkpoints.items()}
    spec = loaded["dense"][1]
    example = spec.example_inputs()
    costs = {name: surgery.count(model, example) for name, (model, _) in loaded.items()}
    plan = [(b, p, n) for b in names for p in precisions if B.applies(b, p) for n in sizes]
    todo = [k for k in plan if not journal.done(k)]
    if len(todo) < len(plan):
        print(f"resuming: {len(plan) - len(todo)} of {len(plan)} points already in {journal.path}", flush=True)
    left_undone = 0

    def remaining() -> float | None:
        return None if total_seconds is None else total_seconds - (clock() - invocation_started)

    def spent() -> bool:
        left = remaining()
        return left is not None and left <= 0

    def cap() -> float:
        left = remaining()
        return point_seconds if left is None else min(point_seconds, left)

    try:
        for backend in names:
            for prec in precisions:
                keys = [k for k in todo if k[0] == backend and k[1] == prec]
                if not keys:
                    continue
                if spent():
                    left_undone += len(keys)
                    continue
                built, build_s, failure = {}, {}, None
                for name, (model, _) in loaded.items():
                    started = clock()
                    limit = cap()
                    try:
                        with _alarm(limit):
                            built[name] = B.prepare(backend, model, example, dev, prec, _artifacts(run_dir),
                                                    name, max(sizes), compile_mode, checkpoint=checkpoints[name])
                        build_s[name] = clock() - started
                    except Exception as exc:  # noqa: BLE001 - one backend's failure must not lose the others
                        failure = (("timed_out", f"building {name} took over {limit:.0f} s", clock() - started)
                                   if _timed_out(exc) else
                                   ("error", f"building {name}: {_one_line(exc)}", clock() - started))
                        break
                if failure and failure[0] == "timed_out" and limit < point_seconds:  # the budget ran out, not the cap
                    left_undone += len(keys)
                    continue
                for key in keys:
                    if failure:
                        point = {"type": "point", "backend": backend, "precision": prec, "batch": key[2],
                                 "status": failure[0], "error": failure[1], "seconds": failure[2]}
                    else:
                        if spent():
                            left_undone += 1
                            continue
                        point = _time_point(key, built, build_s, spec, dev, warmup, rounds, min_iters, min_seconds,
                                            cap(), point_seconds, clock)
                        if point is None:  # the total budget ran out inside it
                            left_undone += 1
                            continue
                    point |= {"macs": {n: costs[n].macs for n in MODELS},
                              "params": {n: costs[n].params for n in MODELS}}
                    journal.append(point)
                    _progress(point, sum(k in journal.points for k in plan), len(plan))
                    failpoint("bench-point")  # tests: a kill right after a point has landed
                del built
                B.release(backend)  # torch.compile's graphs
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        journal.close()
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


def _time_point(key, built, build_s, spec, dev, warmup, rounds, min_iters, min_seconds, limit, point_seconds,
                clock) -> dict | None:
    backend, prec, batch = key
    started = clock()
    point = {"type": "point", "backend": backend, "precision": prec, "batch": batch,
             "cuda_graphs": built["dense"].cuda_graphs, "note": built["dense"].note,
             "build_seconds": build_s, "format": built["dense"].format,
             "artifact_bytes": {n: p.artifact.stat().st_size if p.artifact and p.artifact.is_file() else None
                                for n, p in built.items()}}
    try:
        x = torch.randn(batch, *spec.input_shape, device=dev, dtype=built["dense"].input_dtype)
        if dev.type == "cuda" and B.BACKENDS.get(backend).info.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        with _alarm(limit + min(10.0, 0.2 * limit)):  # the loop stops itself at the limit; this catches a hang
            timed = measure_pair({n: p.fn for n, p in built.items()}, x, dev, warmup=warmup, rounds=rounds,
                                 min_iters=min_iters, min_seconds=min_seconds, max_seconds=limit, clock=clock)
    except Exception as exc:  # noqa: BLE001 - recorded, and the other points go on
        if not _timed_out(exc):
            return point | {"status": "error", "error": _one_line(exc), "seconds": clock() - started}
        if limit < point_seconds:
            return None
        return point | {"status": "timed_out", "error": f"no result within {limit:.0f} s", "seconds": clock() - started}
    il = timed["interleaved"]
    if il["timed_out"] and limit < point_seconds:
        return None
    point |= {"status": "timed_out" if il["timed_out"] else "ok", "seconds": clock() - started,
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
