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
    assert saved["mac_speedup"] > 1.5 and saved["device"].startswith("cpu") and saved["command"] == ["compress", "bench"]
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
