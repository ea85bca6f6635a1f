"""Resumable training: every stage that trains keeps its latest progress in one file.

A run directory holds ``.state/`` while the run is unfinished: ``run.json`` (the run's
settings), one ``<stage>.pt`` per training stage (dense training, a criterion's own
training, fine-tuning) and any criterion's search state. A stage file holds everything
the next epoch depends on: weights, optimizer, LR schedule, grad scaler, epoch and step,
every RNG state (Python, NumPy, torch CPU and CUDA), the data order and position, the
epoch's running sums and the state of stateful training hooks. It is written atomically
(a kill leaves the previous one), and only the latest one per stage is kept.

A resumed run replays the same code from the start with the same settings: a stage
whose file says it finished loads its final state instead of training, and an unfinished
one continues from its last save. Everything between stages is deterministic given the
weights and seeds, so on a CPU the resumed run ends bit for bit where an unbroken one ends.
When the run finishes, ``.state/`` is removed.
"""
from __future__ import annotations

import fcntl
import os
import random
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import distributed
from .errors import CompressorError
from .files import atomic_path

FORMAT = "compressor.train-state/1"
STATE_DIR = ".state"


@dataclass
class StageState:
    """Where one training stage keeps its progress, and how often it saves inside an epoch."""

    path: Path
    every_steps: int = 0  # also save every N optimizer steps inside an epoch; 0: at epoch ends only

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged file has many failure modes
            raise CompressorError(f"cannot read the training state {self.path} ({type(exc).__name__}: {exc}); "
                                  f"delete it to redo that stage") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CompressorError(f"{self.path} is not a compressor training state")
        return state


class RunState:
    """The ``.state/`` folder of one run directory, held by one process at a time."""

    def __init__(self, out: str | os.PathLike, every_steps: int = 0):
        self.dir = Path(out) / STATE_DIR
        self.every_steps = every_steps
        self._lock = None

    def stage(self, name: str) -> StageState:
        return StageState(self.dir / f"{name}.pt", self.every_steps)

    def lock(self) -> None:
        """Refuse a second process in the same run directory (its files would interleave).

        Under torchrun, rank 0 owns the directory: it alone locks, clears and cleans it. The lock is a POSIX
        record lock (``lockf``), which belongs to this process alone: DataLoader workers forked from it do not
        hold it, so a killed run's lock goes with the run, not later with its workers."""
        if not distributed.is_main():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.dir / "lock", "w")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise CompressorError(f"another compress process is working in {self.dir.parent}") from None
        self._lock = handle

    def remove_partials(self) -> list[Path]:
        """Delete the temporary files a killed process left (safe: this process holds the lock)."""
        found = []
        if not distributed.is_main():
            return found
        for folder in (self.dir.parent, self.dir):
            if folder.is_dir():
                found += [p for p in folder.glob(".*.partial") if p.is_file()]
        for p in found:
            p.unlink(missing_ok=True)
        return found

    def clear(self) -> None:
        """Forget every saved stage (a fresh run, or a finished one)."""
        if self.dir.is_dir() and distributed.is_main():
            for p in self.dir.iterdir():
                if p.name != "lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    def close(self, finished: bool) -> None:
        if finished and self.dir.is_dir() and distributed.is_main():
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """random.setstate needs the tuples that a round trip through torch.save may have kept as lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def cpu_copy(obj):
    """A deep copy with every tensor on the CPU, taken now, so a background write sees a snapshot."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class Writer:
    """Writes states in a background thread, one at a time: training goes on while the disk works.

    The snapshot is taken on the caller's thread (a copy to the CPU), so later optimizer
    steps cannot leak into it; ``flush`` waits for the last write (committed and fsynced once
    it returns) and raises its error. ``fit`` reports an epoch from ``save``'s ``committed``
    callback, once the epoch's state is on disk, so a reported epoch is never trained again
    after a kill, while the next epoch already trains.
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, path: Path, state: dict, committed: Callable[[], None] | None = None) -> None:
        """Write ``state`` to ``path`` in the background; ``committed`` runs (on the writer's thread) once the file
        is on disk, never if the write fails."""
        snapshot = cpu_copy(state)
        self.flush()

        def write():
            try:
                with atomic_path(path, durable=True) as tmp:  # on the disk, not only in the page cache
                    torch.save(snapshot, tmp)
                if committed is not None:
                    committed()
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread by flush()
                self._error = exc

        self._thread = threading.Thread(target=write, name="compressor-state-writer", daemon=True)
        self._thread.start()

    def flush(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CompressorError(f"could not save the training state: {error}")
