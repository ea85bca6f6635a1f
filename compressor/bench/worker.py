"""Where the benchmark builds and times: a worker process the caller can kill, or this process.

:class:`Worker` is a child process that builds and times (:class:`Work`) at the bench's request;
a request without an answer within its cap kills it, so a build or a call that never returns
ends there and the bench goes on (:mod:`compressor.bench.run`). A timeout thus never interrupts
the caller's own torch code: an exception raised into it by a timer at an arbitrary bytecode once
left autograd off for the rest of the process, when a ``torch.no_grad()`` block was cut after
switching it off and before its exit was armed. :class:`InProcess` does the same work here, with
only the timing loop's own cap, for a backend a fresh process cannot import (:func:`portable`).
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

import torch

from .. import checkpoint
from . import backends as B
from .harness import measure_pair

START_SECONDS = 600.0  # a worker imports torch and loads both checkpoints; no point's cap counts that


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class TimedOut(Exception):
    """No answer within the cap: the worker was killed."""


class Failed(Exception):
    """A build or a timing failed in the worker; ``str()`` is its one-line description."""


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, Failed) else one_line(exc)


class Work:
    """What builds and timings work on, in whichever process runs them: both models, the example
    input, the device, and one backend's two builds at a time."""

    def __init__(self, loaded: dict, checkpoints: dict, dev: torch.device):
        self.loaded, self.checkpoints, self.dev = loaded, checkpoints, dev
        self.spec = loaded["dense"][1]
        self.example = self.spec.example_inputs()
        self.built: dict[str, B.Prepared] = {}

    def build(self, backend, prec, name, workdir, max_batch, compile_mode) -> dict:
        started = time.perf_counter()
        p = B.prepare(backend, self.loaded[name][0], self.example, self.dev, prec, workdir, name, max_batch,
                      compile_mode, checkpoint=self.checkpoints[name])
        self.built[name] = p
        return {"seconds": time.perf_counter() - started, "cuda_graphs": p.cuda_graphs, "note": p.note,
                "format": p.format,
                "artifact_bytes": p.artifact.stat().st_size if p.artifact and p.artifact.is_file() else None}

    def time(self, backend, batch, warmup, rounds, min_iters, min_seconds, limit) -> dict:
        x = torch.randn(batch, *self.spec.input_shape, device=self.dev, dtype=self.built["dense"].input_dtype)
        if self.dev.type == "cuda" and B.BACKENDS.get(backend).info.get("channels_last"):
            x = x.contiguous(memory_format=torch.channels_last)
        timed = measure_pair({n: p.fn for n, p in self.built.items()}, x, self.dev, warmup=warmup, rounds=rounds,
                             min_iters=min_iters, min_seconds=min_seconds, max_seconds=limit)
        # every call's time stays here: the point keeps the statistics and the per-round ratios
        timed["interleaved"] = {k: v for k, v in timed["interleaved"].items() if k not in ("times", "round_ms")}
        return timed

    def release(self, backend) -> None:
        self.built.clear()
        B.release(backend)  # torch.compile's graphs
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()


def portable(entry) -> bool:
    """Whether a fresh process can import ``entry`` (a backend): a function defined inside another cannot be,
    nor one of the caller's ``__main__`` (a script or a notebook), which pickles by a name the worker lacks."""
    if getattr(getattr(entry, "target", entry), "__module__", None) == "__main__":
        return False
    try:
        pickle.dumps(entry)
    except Exception:  # noqa: BLE001 - PicklingError, AttributeError ("local object"), TypeError
        return False
    return True


class InProcess:
    """Builds and times in this process, with only the timing loop's own cap: a build or a first call
    that never returns hangs the bench. For a backend a worker cannot import."""

    def __init__(self, work: Work):
        self.work = work
        self.group: tuple | None = None  # the (backend, precision) built
        self.builds: dict = {}

    def call(self, op: str, args: tuple, timeout: float | None):
        return getattr(self.work, op)(*args)

    def release(self, backend: str, timeout: float | None = None) -> None:
        self.work.release(backend)
        self.group = None


class Worker:
    """A child process that builds and times (:class:`Work`), answering one request at a time.

    A request without an answer within its cap kills the process; the next request starts a new one
    (which loads the checkpoints again; the caller builds again). It is a fresh interpreter
    (``python -c``: not a fork of this process, whose threads and CUDA context a fork would copy half
    of, nor multiprocessing's spawn, which would run the caller's main script again in it unless that
    script guards itself); its ``PYTHONPATH`` is this process's ``sys.path``,
    so a backend defined in an importable module of the caller works there too. Ctrl-C is left to this
    process, which stops the worker; a worker whose parent is gone (killed) exits within a second.
    """

    def __init__(self, checkpoints: dict, trusted_factories, device: torch.device, backends: list):
        """``backends``: the registry entries it runs (pickled by reference: a plug-in's module is imported)."""
        self.setup = {"checkpoints": checkpoints, "trusted_factories": list(trusted_factories or ()),
                      "device": str(device), "threads": torch.get_num_threads(), "backends": pickle.dumps(backends)}
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.ready = False
        self.busy = False  # a request is under way (an interrupt came while waiting for it)
        self.group: tuple | None = None
        self.builds: dict = {}

    def launch(self) -> None:
        """Start the process; :meth:`call` waits for it to be ready."""
        ours, theirs = multiprocessing.Pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
        env.pop("COMPRESSOR_KILL_AT", None)  # the tests' kills are for this process; the worker's are its own
        self.proc = subprocess.Popen([sys.executable, "-c", "from compressor.bench.worker import serve; "
                                      f"serve({theirs.fileno()})"], pass_fds=(theirs.fileno(),), env=env,
                                     stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = ours
        self.conn.send(self.setup)
        self.ready = False

    def call(self, op: str, args: tuple, timeout: float | None):
        if self.proc is None:
            self.launch()
        if not self.ready:
            self._answer(START_SECONDS, "starting")
            self.ready = True
        try:
            self.conn.send((op, args))
        except OSError:
            code = self.proc.wait()
            self.kill()
            raise Failed(f"the benchmark worker had died (exit code {code})") from None
        self.busy = True
        answer = self._answer(timeout, op)
        self.busy = False
        return answer

    def _answer(self, timeout: float | None, doing: str):
        if not self.conn.poll(None if timeout is None else max(0.0, timeout)):
            self.kill()
            if doing == "starting":
                raise Failed(f"the benchmark worker did not start within {START_SECONDS:.0f} s")
            raise TimedOut()
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.wait()
            self.kill()
            raise Failed(f"the benchmark worker died while {doing} (exit code {code})") from None
        if status == "error":
            if doing == "starting":
                self.kill()
            raise Failed(value)
        return value

    def release(self, backend: str, timeout: float | None = None) -> None:
        if self.proc is not None:
            try:
                self.call("release", (backend,), timeout)
            except Exception:  # noqa: BLE001 - what it held goes with it
                self.kill()
        self.group = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.conn.close()
        self.proc = self.conn = None
        self.ready = self.busy = False
        self.group = None

    def close(self) -> None:
        """Stop the process: asked, when it is idle; else (starting, or busy when an interrupt came) killed."""
        if self.proc is not None and self.ready and not self.busy:
            try:
                self.conn.send(("stop", ()))
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


def serve(fd: int) -> None:
    """The worker's side: read the setup, load the checkpoints, then answer each ``(op, args)`` with
    ``("ok", value)`` or ``("error", one line)`` until ``stop`` or until the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops this process
    parent = os.getppid()

    def orphaned() -> None:  # a parent killed mid-request (SIGKILL) cannot stop this process: it stops itself
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()
    conn = Connection(fd)
    try:
        setup = conn.recv()
        for entry in pickle.loads(setup["backends"]):  # the parent's registrations, plug-ins included
            B.BACKENDS.add(entry.name, entry.target, **entry.info)
        torch.set_num_threads(setup["threads"])
        loaded = {name: checkpoint.load(path, with_spec=True, trusted_factories=setup["trusted_factories"])
                  for name, path in setup["checkpoints"].items()}
        work = Work(loaded, setup["checkpoints"], torch.device(setup["device"]))
    except Exception as exc:  # noqa: BLE001 - the parent records it
        conn.send(("error", one_line(exc)))
        return
    conn.send(("ok", None))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            op = "stop"  # the parent is gone
        if op == "stop":
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # nothing to keep: skip the interpreter's teardown of torch (a third of a second)
        try:
            reply = ("ok", getattr(work, op)(*args))
        except Exception as exc:  # noqa: BLE001 - the parent records it
            reply = ("error", one_line(exc))
        try:
            conn.send(reply)
        except OSError:
            return
