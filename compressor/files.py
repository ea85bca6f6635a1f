"""Atomic writes: a file is either absent or complete, never half-written."""
from __future__ import annotations

import json
import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

from . import distributed


@contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``durable``: also flush the file to the disk before the rename and the rename itself after it (fsync of
    the file and of its folder), so that the file survives the machine going down, not only the process.

    Under torchrun only rank 0 writes: other ranks get a scratch path that is thrown away,
    so no code that writes a file needs to ask which rank it runs on.
    """
    path = Path(path)
    if not distributed.is_main():
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch) / path.name
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if durable:
            _fsync(tmp)
        failpoint(f"rename-{path.name}")  # a kill here leaves the complete temporary file behind
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_object(path: str | os.PathLike, what: str, fix: str) -> dict:
    """The JSON object in the file at ``path`` (a file the toolkit wrote and reads back), or one CompressorError:
    "``path`` is damaged (...); ``fix``" or "``path`` does not hold ``what``; ``fix``"."""
    from .errors import CompressorError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise CompressorError(f"{path} is damaged ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise CompressorError(f"{path} does not hold {what}; {fix}")
    return data


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


_hits: dict[str, int] = {}


def failpoint(name: str) -> None:
    """A test hook: SIGKILL this process at the named point when ``COMPRESSOR_KILL_AT`` is ``name``
    (or ``name@N``, at its N-th pass; under torchrun only on rank ``COMPRESSOR_KILL_RANK`` if set, and
    never after an elastic restart). The resume tests cut a run there, as a reclaimed machine would."""
    wanted = os.environ.get("COMPRESSOR_KILL_AT")
    if not wanted or not wanted.startswith(name):
        return
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return  # a worker that torchrun restarted is not cut again
    if os.environ.get("COMPRESSOR_KILL_RANK", str(distributed.rank())) != str(distributed.rank()):
        return
    target, _, count = wanted.partition("@")
    if target == name:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
