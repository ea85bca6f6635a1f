import json

import pytest
import torch

from compressor.bench.harness import measure, summarize
from compressor.bench.run import bench
from compressor.cli import main
from compressor.pipeline import RunConfig, run


def test_summary_statistics():
    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0], batch=10)
    assert s["median_ms"] == 3.0 and s["min_ms"] == 1.0 and s["iterations"] == 5
    assert s["p90_ms"] == pytest.approx(61.6) and s["p99_ms"] >= s["p90_ms"] >= s["median_ms"]
    assert s["throughput"] == pytest.approx(10 / 0.003)


def test_measure_on_cpu_has_no_transfer_timing():
    r = measure(lambda x: x * 2, torch.ones(4, 3), torch.device("cpu"), warmup=1, min_iters=5, min_seconds=0.0)
    assert set(r) == {"compute"} and r["compute"]["iterations"] == 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "conv4"
    run(RunConfig(model="conv4", dataset="synthetic", epochs=0, finetune_epochs=0, out=str(out)))
    return out


def test_bench_writes_reports(run_dir):
    result = bench(run_dir, backends="eager,ort", batch_sizes="1,4", device="cpu", warmup=2, min_iters=5,
                   min_seconds=0.0, argv=["compress", "bench"])
    saved = json.loads((run_dir / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert len(saved["rows"]) == 2 * 2 * 2  # backends x models x batch sizes
    for row in saved["rows"]:
        c = row["compute"]
        assert 0 < c["min_ms"] <= c["median_ms"] <= c["p99_ms"] and c["throughput"] > 0
        assert row["macs"] > 0 and c["iterations"] >= 5
    assert {(s["backend"], s["batch"]) for s in saved["speedups"]} == {(b, n) for b in ("eager", "ort") for n in (1, 4)}
    assert saved["mac_speedup"] > 1.5 and saved["device"].startswith("cpu")
    assert saved["command"] == ["compress", "bench"]
    md = (run_dir / "bench.md").read_text()
    assert "| eager | 1 |" in md and "| ort | 4 |" in md and "MAC speedup" in md
    for png in ("bench-speedup.png", "bench-latency.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [
    (["--backends", "eager,warp"], "unknown backend"),
    (["--backends", "trt"], "needs a CUDA GPU"),
    (["--precision", "fp16"], "fp16 benchmarks are for GPUs"),
    (["--batch-sizes", "1,x"], "whole numbers"),
])
def test_bench_bad_inputs(run_dir, capsys, args, words):
    if torch.cuda.is_available():
        pytest.skip("these inputs are only errors on a machine without a GPU")
    assert main(["bench", str(run_dir), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_bench_needs_a_run_directory(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert "not a finished run directory" in capsys.readouterr().err


# --- interleaved timing, streaming and resume, compile modes, the report (issue 16) ---

import os
import shutil
import signal
import statistics
import subprocess
import sys

from compressor.bench import report
from compressor.bench.harness import interleave, time_calls
from compressor.bench.run import JSONL, Journal
from compressor.errors import CompressorError


class DriftingWorld:
    """Fake time: calls advance a true time; the clock reads it at a speed that grows as time passes
    (reading = t + drift t^2), as a throttling or boosting GPU would skew a stopwatch."""

    def __init__(self, drift=1.0):
        self.t, self.drift = 0.0, drift

    def clock(self):
        return self.t + self.drift * self.t * self.t

    def model(self, cost_s):
        def call():
            self.t += cost_s
        return call


def test_interleaving_cancels_clock_drift():
    cpu = torch.device("cpu")
    naive_world = DriftingWorld()
    dense, pruned = naive_world.model(0.002), naive_world.model(0.001)  # truly 2x faster
    kw = dict(warmup=0, min_iters=500, min_seconds=0.0, clock=naive_world.clock)
    naive = statistics.median(time_calls(dense, cpu, **kw)) / statistics.median(time_calls(pruned, cpu, **kw))
    world = DriftingWorld()
    timed = interleave({"dense": world.model(0.002), "pruned": world.model(0.001)}, cpu, warmup=0, rounds=100,
                       min_iters=300, min_seconds=0.0, clock=world.clock)
    assert abs(naive - 2.0) > 0.5  # back to back, the drift is read as a speed difference
    assert timed["speedup"]["pruned"] == pytest.approx(2.0, rel=0.01)  # interleaved, it cancels
    assert timed["rounds"] == 100 and len(timed["times"]["dense"]) == 300 and not timed["timed_out"]
    # order alternates, so the per-round ratios straddle the truth
    r = timed["ratios"]["pruned"]
    assert min(r) < 2.0 < max(r)


def test_interleave_stops_at_its_cap():
    world = DriftingWorld(drift=0.0)
    timed = interleave({"dense": world.model(0.01), "pruned": world.model(0.01)}, torch.device("cpu"), warmup=0,
                       rounds=10, min_iters=30, min_seconds=100.0, max_seconds=0.5, clock=world.clock)
    # bursts of 3 calls per model: it stops within one round (0.06 s) of the cap, keeping what it measured
    assert timed["timed_out"] and 0 < timed["rounds"] < 10 and world.t < 0.56
    assert len(timed["times"]["dense"]) == 3 * timed["rounds"]


@pytest.fixture
def fresh_run(run_dir, tmp_path):
    """A copy of the finished run with no bench files in it."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("dense.pt", "pruned.pt", "metrics.json"):
        shutil.copy(run_dir / name, out / name)
    return out


FAST = dict(device="cpu", warmup=1, min_iters=4, min_seconds=0.0, rounds=2)


def _points(run):
    return Journal.read(run / JSONL)[1]


def test_bench_resumes_after_an_interruption(fresh_run, monkeypatch):
    import compressor.bench.run as R

    appended = []
    real_append = R.Journal.append

    def append_then_die(self, point):
        real_append(self, point)
        appended.append(point)
        if len(appended) == 2:
            raise KeyboardInterrupt  # as a kill right after the second point landed

    monkeypatch.setattr(R.Journal, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        bench(fresh_run, backends="eager,ort", batch_sizes="1,2", **FAST)
    first = (fresh_run / JSONL).read_text().splitlines()
    assert len(first) == 3 and not (fresh_run / "bench.json").exists()  # settings + 2 points, each on disk at once
    monkeypatch.setattr(R.Journal, "append", real_append)

    with pytest.raises(CompressorError, match="--resume"):
        bench(fresh_run, backends="eager,ort", batch_sizes="1,2", **FAST)
    with pytest.raises(CompressorError, match="other settings.*rounds"):
        bench(fresh_run, backends="eager,ort", batch_sizes="1,2", resume=True, **(FAST | {"rounds": 3}))
    timed = []
    real_time = R._time_point
    monkeypatch.setattr(R, "_time_point", lambda key, *a: timed.append(key) or real_time(key, *a))
    result = bench(fresh_run, backends="eager,ort", batch_sizes="1,2", resume=True, argv=["compress", "bench"], **FAST)
    assert (fresh_run / JSONL).read_text().splitlines()[:3] == first  # the finished points were kept, not redone
    done_before = {(p["backend"], p["precision"], p["batch"]) for p in appended}
    assert not done_before & set(timed) and len(timed) == 2
    keys = [(p["backend"], p["precision"], p["batch"]) for p in _points(fresh_run)]
    assert sorted(keys) == sorted({(b, "fp32", n) for b in ("eager", "ort") for n in (1, 2)})  # each point once
    assert len(result["rows"]) == 8 and result["complete"]
    for name in ("bench.json", "bench.md", "bench-speedup.png", "bench-latency.png"):
        assert (fresh_run / name).is_file()
    assert not list(fresh_run.glob(".*.partial"))
    # --overwrite starts afresh
    bench(fresh_run, backends="eager", batch_sizes="1", overwrite=True, **FAST)
    assert [(p["backend"], p["batch"]) for p in _points(fresh_run)] == [("eager", 1)]


def test_bench_killed_in_a_subprocess_resumes(fresh_run):
    # the same thread count as this process: a resume with other settings (threads are one) is refused
    env = dict(os.environ, COMPRESSOR_KILL_AT="bench-point@1")
    cmd = [sys.executable, "-m", "compressor.cli", "bench", str(fresh_run), "--device", "cpu", "--backends", "eager",
           "--batch-sizes", "1,2,3", "--warmup", "1", "--min-iters", "4", "--min-seconds", "0", "--rounds", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "[1/3] eager" in proc.stdout  # the progress line came before the kill
    killed = _points(fresh_run)
    assert len(killed) == 1 and not (fresh_run / "bench.json").exists()
    assert main(cmd[3:] + ["--resume"]) == 0
    points = _points(fresh_run)
    assert points[0] == killed[0] and sorted(p["batch"] for p in points) == [1, 2, 3]
    saved = json.loads((fresh_run / "bench.json").read_text())
    assert {s["batch"] for s in saved["speedups"]} == {1, 2, 3} and "--resume" in saved["command"]


def test_a_point_past_its_cap_is_recorded_as_timed_out(fresh_run):
    result = bench(fresh_run, backends="eager", batch_sizes="1", point_seconds=1e-9, **FAST)
    (point,) = result["points"]
    assert point["status"] == "timed_out" and "error" in point and result["rows"] == []
    assert "timed_out" in (fresh_run / "bench.md").read_text()
    again = bench(fresh_run, backends="eager", batch_sizes="1", resume=True, **FAST)  # not retried
    assert again["points"] == result["points"]


def test_a_point_that_hangs_is_killed_and_this_process_is_unharmed(fresh_run, monkeypatch):
    """A call that never returns (and switched autograd off first) runs in the bench's worker process: the
    worker is killed at the cap, the point is recorded as timed out, and the bench goes on in a new worker."""
    import time

    from compressor.bench import backends as B

    from . import hang_backend

    monkeypatch.setattr(B.BACKENDS, "_entries", dict(B.BACKENDS._entries))  # restored after the test
    B.BACKENDS.add("hang", hang_backend.build, precisions=("fp32",), help="hangs at batch 2")
    started = time.perf_counter()
    result = bench(fresh_run, backends="hang,eager", batch_sizes="1,2,3", point_seconds=2, **FAST)
    assert time.perf_counter() - started < 120  # the hour-long call was not waited for
    points = {(p["backend"], p["batch"]): p for p in result["points"]}
    assert points[("hang", 2)]["status"] == "timed_out"
    assert points[("hang", 2)]["error"] == "no result within 2 s" and points[("hang", 2)]["seconds"] >= 2
    # the points after it ran: batch 3 in a new worker (built again), then the next backend
    assert [points[("hang", n)]["status"] for n in (1, 3)] == ["ok", "ok"]
    assert [points[("eager", n)]["status"] for n in (1, 2, 3)] == ["ok", "ok", "ok"]
    assert len(result["rows"]) == 2 * 5  # models x the points that finished
    assert "hang fp32 batch 2: timed_out" in (fresh_run / "bench.md").read_text()
    # this process was never interrupted: autograd is on and works
    assert torch.is_grad_enabled()
    w = torch.ones(2, requires_grad=True)
    (3 * w).sum().backward()
    assert w.grad.tolist() == [3.0, 3.0]
    again = bench(fresh_run, backends="hang,eager", batch_sizes="1,2,3", point_seconds=2, resume=True, **FAST)
    assert again["points"] == result["points"]  # a timed-out point is not retried


def test_total_budget_leaves_points_for_resume(fresh_run, capsys):
    result = bench(fresh_run, backends="eager", batch_sizes="1,2", total_seconds=1e-9, **FAST)
    assert result["points"] == [] and not result["complete"]
    assert "--resume" in capsys.readouterr().out and "incomplete" in (fresh_run / "bench.md").read_text()


def test_compile_mode_is_validated(run_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", str(run_dir), "--compile-mode", "fastest"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", str(run_dir), "--point-seconds", "-1"])
    assert "--point-seconds must be greater than 0" in capsys.readouterr().err
    with pytest.raises(CompressorError, match="--compile-mode must be one of"):
        bench(run_dir, compile_mode="fastest", device="cpu")
    with pytest.raises(CompressorError, match="--rounds"):
        bench(run_dir, rounds=0, device="cpu")
    from compressor.cli import build_parser

    args = build_parser().parse_args(["bench", "r", "--compile-mode", "max-autotune", "--total-seconds", "30"])
    assert args.compile_mode == "max-autotune" and args.total_seconds == 30.0


def _point(backend, precision, batch, dense_ms, pruned_ms, status="ok"):
    stats = lambda ms: {"compute": {"median_ms": ms, "p99_ms": ms * 1.5, "throughput": batch / ms * 1000}}  # noqa: E731
    return {"type": "point", "backend": backend, "precision": precision, "batch": batch, "status": status,
            "speedup": dense_ms / pruned_ms, "speedup_iqr": [1.0, 5.0], "rounds": 10, "format": "onnx",
            "artifact_bytes": {"dense": 58_000_000, "pruned": 4_000_000}, "cuda_graphs": backend == "compile",
            "build_seconds": {"dense": 1.0, "pruned": 0.5}, "first_call_ms": {"dense": 900.0, "pruned": 800.0},
            "seconds": 2.0, "models": {"dense": stats(dense_ms), "pruned": stats(pruned_ms)}}


def test_report_summary_table_and_goals():
    points = [_point("ort", "fp32", 1, 0.5, 0.2), _point("ort", "int8", 256, 4.0, 1.0),
              _point("compile", "fp16", 256, 4.0, 1.0), _point("compile", "fp16", 1, 0.3, 0.12),
              _point("aoti", "fp16", 32, 1.0, 1.25),
              {"type": "point", "backend": "aoti", "precision": "fp16", "batch": 1024, "status": "timed_out",
               "error": "no result within 60 s"}]
    result = {"model": "vgg16", "dataset": "cifar10", "device": "NVIDIA H200", "command": ["compress", "bench", "r"],
              "date": "2026-11-30", "started": "2026-11-30", "versions": {"commit": "abc1234", "torch": "2.11"},
              "macs": {"dense": 313e6, "pruned": 78e6}, "params": {"dense": 15e6, "pruned": 1e6}, "mac_speedup": 4.0,
              "accuracy": {"dense": {"test": 0.93}, "finetuned": {"test": 0.91}},
              "export": {"onnx": {"fp16": False, "accuracy": 0.9087}, "onnx-int8": {"accuracy": {"top1": 90.5}},
                         "aoti": {"accuracy": "garbage"}},
              "timing": {"clock": "CUDA events", "method": "interleaved", "rounds": 10, "min_iters": 30,
                         "min_seconds": 1.0, "warmup": 10, "compile_mode": "reduce-overhead", "point_seconds": 60},
              "points": points}
    result["speedups"] = report.speedups(points)
    md = report.markdown(result)
    header = next(line for line in md.splitlines() if line.startswith("| backend | batch | precision"))
    for column in ("format", "size MB", "top-1", "p50 ms", "p99 ms", "img/s", "measured speedup", "MAC speedup",
                   "with transfers", "CUDA graphs"):
        assert f" {column} |" in header
    assert "| ort | 1 | fp32 | onnx | 58.0 → 4.0 | — → 90.87% | 0.500 → 0.200 |" in md
    assert "| ort | 256 | int8 |" in md and "90.50%" in md  # export.json's int8 entry, in percent
    assert "NVIDIA H200" in md and "abc1234" in md and "compress bench r" in md and "4.00x" in md
    assert "aoti fp16 batch 1024: timed_out" in md and "## Build and compile costs" in md
    assert len(result["speedups"]) == 5
    goals = "\n".join(report.goals(result))
    assert "PASS: throughput speedup at batch 256 (fp16) >= 3.4x: best 4.00x (compile)" in goals
    assert "PASS: pruned batch-1 latency <= 0.15 ms: best 0.120 ms (compile fp16)" in goals
    assert "FAIL: pruned never slower than dense" in goals and "aoti fp16 batch 32 0.80x" in goals


@pytest.mark.parametrize("flag, text, value, words", [
    ("--rounds", "0", 0, "--rounds must be at least 1, got 0"),
    ("--total-seconds", "nan", float("nan"), "--total-seconds must be a finite number"),
])
def test_run_bench_refuses_new_bench_numbers_before_training(tmp_path, capsys, flag, text, value, words):
    out = tmp_path / "r"
    with pytest.raises(SystemExit):
        main(["run", "--dataset", "synthetic", "--out", str(out), "--bench", flag, text])
    assert words in capsys.readouterr().err and not out.exists()
    with pytest.raises(CompressorError, match=words.split(",")[0]):
        bench(tmp_path / "missing", **{flag[2:].replace("-", "_"): value})


def test_a_backend_of_the_callers_main_runs_in_process():
    """A backend defined in a script or a notebook (``__main__``) pickles by a name a fresh worker lacks: it
    runs in this process instead of failing every backend of the worker."""
    from types import SimpleNamespace

    from compressor.bench import worker

    def build(model, b):
        return model

    build.__module__ = "__main__"
    assert not worker.portable(SimpleNamespace(target=build))
    from compressor.bench.backends import BACKENDS

    assert worker.portable(BACKENDS.get("eager"))
