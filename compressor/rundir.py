"""The run directory's layout, in one place.

A run directory holds ``dense.pt`` and ``pruned.pt`` (see checkpoint.py), ``plan.json``,
``metrics.json`` (a RunRecord, see record.py; written last: a directory with it holds a finished run), the criterion's
own files, ``export/`` (``export.json`` and the artifacts), ``bench.jsonl`` (points as they
finish), ``bench.json`` and ``bench.md``, and ``.state/`` (progress of an unfinished run).
The pipeline, export, bench and compare find those files here, never by spelling names.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CompressorError
from .record import RunRecord


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    def __str__(self) -> str:
        return str(self.path)

    dense = property(lambda self: self.path / "dense.pt")
    pruned = property(lambda self: self.path / "pruned.pt")
    plan = property(lambda self: self.path / "plan.json")
    metrics = property(lambda self: self.path / "metrics.json")
    state = property(lambda self: self.path / ".state")
    export_dir = property(lambda self: self.path / "export")
    export_json = property(lambda self: self.path / "export" / "export.json")
    bench_jsonl = property(lambda self: self.path / "bench.jsonl")
    bench_json = property(lambda self: self.path / "bench.json")
    bench_md = property(lambda self: self.path / "bench.md")
    bench_artifacts = property(lambda self: self.path / "bench-artifacts")
    bench_speedup_png = property(lambda self: self.path / "bench-speedup.png")
    bench_latency_png = property(lambda self: self.path / "bench-latency.png")
    log = property(lambda self: self.path / "log.txt")

    @classmethod
    def holding(cls, path: str | Path) -> "RunDir | None":
        """``path`` as a run directory if it is one (it holds ``pruned.pt``), else None."""
        run = cls(path)
        return run if run.path.is_dir() and run.pruned.is_file() else None

    def finished(self) -> bool:
        return self.metrics.is_file()

    def _metrics_object(self) -> dict:
        try:
            metrics = json.loads(self.metrics.read_text())
        except FileNotFoundError:
            raise CompressorError(f"{self.path} holds no finished run (no metrics.json)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise CompressorError(f"{self.metrics} is damaged: {exc}") from None
        if not isinstance(metrics, dict):
            raise CompressorError(f"{self.metrics} does not hold a run's metrics (a JSON object)")
        return metrics

    def record(self, fix: str | None = None) -> RunRecord:
        """The finished run's record, or one clear error (a record of another format: which, and ``fix``)."""
        return RunRecord.from_json(self._metrics_object(), self.metrics, *([fix] if fix else []))

    def read_metrics(self) -> dict:
        """The finished run's metrics.json content, checked as a record of this version's format."""
        return self.record().to_json()

    def update_metrics(self, key: str, value) -> None:
        """Set ``metrics.json[key]`` (export adds its results), atomically; nothing if the run is unfinished.
        The file is not read as a record: an older run's file gets the entry too, and stays as it was otherwise."""
        from .files import write_json

        if self.finished():
            write_json(self.metrics, self._metrics_object() | {key: value})


def make_dir(path, flag: str = "--out") -> Path:
    """Create the output folder ``path`` (and its parents), or one clear error saying why it cannot be."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise CompressorError(f"{flag} {path} exists and is not a directory")
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            raise CompressorError(f"{flag} {path} cannot be created: {blocker} is a file, not a directory")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # too long a name, a read-only file system, no permission, ...
        raise CompressorError(f"{flag} {path} cannot be created ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CompressorError(f"{flag} {path} is not writable by this user")
    return path
