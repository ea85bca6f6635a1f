"""Adding a bench backend or an export format touches one file: here, this test file alone.

A toy backend and a toy format are registered (and unregistered afterwards) in the registries
the real dispatchers read, then the real ``bench`` and ``export`` run them on a tiny run.
"""
import copy
import json

import pytest
import torch

from compressor.bench import backends as B
from compressor.bench.run import JSONL, Journal, bench
from compressor.export import FORMATS, parse_formats
from compressor.export.run import export
from compressor.pipeline import RunConfig, run
from compressor.rundir import RunDir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "conv4"
    run(RunConfig(model="conv4", dataset="synthetic", epochs=0, finetune_epochs=0, out=str(out)))
    return out


@pytest.fixture
def toy_backend(monkeypatch):
    """A "toy-eager" backend: the model itself, run eagerly, registered for this test only."""
    monkeypatch.setattr(B.BACKENDS, "_entries", dict(B.BACKENDS._entries))  # restored after the test
    built = []

    @B.BACKENDS.register("toy-eager", precisions=("fp32",), help="the module itself, for this test")
    def toy(model, b: B.Build) -> B.Prepared:
        built.append((b.label, b.precision))
        return B.Prepared(model, b.dtype, False, note="toy", artifact=b.checkpoint, format="pt")

    yield built
    assert "toy-eager" in B.BACKENDS


@pytest.fixture
def toy_format(monkeypatch):
    """A "toy-ts" export format: the weights alone, loaded back into a copy of the module, registered
    for this test only."""
    monkeypatch.setattr(FORMATS, "_entries", dict(FORMATS._entries))

    @FORMATS.register("toy-ts", order=50, needs=("onnx",), help="a state dict, for this test")
    def toy(job) -> None:
        path = job.out / f"{job.stem}.ts"
        torch.save(job.model.state_dict(), path)

        def load():
            model = copy.deepcopy(job.model)
            model.load_state_dict(torch.load(path))
            return model.eval()

        job.check("toy-ts", path, load)
        job.results["toy-ts"]["built_after"] = list(job.artifacts)
        job.artifacts["toy-ts"] = path


def test_a_backend_registered_in_one_place_is_benchmarked(run_dir, toy_backend, tmp_path):
    assert "toy-eager" in B.BACKENDS.names() and B.applies("toy-eager", "fp32") and not B.applies("toy-eager", "int8")
    assert B.parse_backends("toy-eager,eager", torch.device("cpu")) == ["toy-eager", "eager"]
    with pytest.raises(Exception, match="int8 is benchmarked on ort only"):
        B.parse_backends("toy-eager", torch.device("cpu"), ["int8"])
    result = bench(run_dir, backends="toy-eager", batch_sizes="1,2", device="cpu", warmup=1, min_iters=4,
                   min_seconds=0.0, rounds=2, overwrite=True, argv=["compress", "bench"])
    assert sorted(toy_backend) == [("dense", "fp32"), ("pruned", "fp32")]  # built once per model
    points = Journal.read(run_dir / JSONL)[1]
    assert [(p["backend"], p["batch"], p["status"]) for p in points] == [("toy-eager", 1, "ok"), ("toy-eager", 2, "ok")]
    assert all(p["note"] == "toy" and p["format"] == "pt" and p["speedup"] > 0 for p in points)
    saved = json.loads(RunDir(run_dir).bench_json.read_text())
    assert {(s["backend"], s["batch"]) for s in saved["speedups"]} == {("toy-eager", 1), ("toy-eager", 2)}
    assert len(saved["rows"]) == len(result["rows"]) == 2 * 2  # models x batch sizes
    assert "| toy-eager | 1 |" in RunDir(run_dir).bench_md.read_text()


def test_unregistered_afterwards():
    assert "toy-eager" not in B.BACKENDS and "toy-ts" not in FORMATS
    with pytest.raises(Exception, match="unknown backend"):
        B.parse_backends("toy-eager", torch.device("cpu"))


def test_a_format_registered_in_one_place_is_exported(run_dir, toy_format, tmp_path):
    assert parse_formats("toy-ts") == ["toy-ts"]
    results = export(run_dir, "toy-ts", out=tmp_path / "out", accuracy=False)
    assert results["toy-ts"]["verification"]["top1_agreement"] >= 0.99
    assert results["toy-ts"]["built_after"] == ["onnx"]  # what it needs was built first, and verified too
    assert results["onnx"]["verification"]["top1_agreement"] >= 0.99
    assert (tmp_path / "out" / "conv4-pruned.ts").is_file()
    assert json.loads((tmp_path / "out" / "export.json").read_text())["toy-ts"]["path"].endswith(".ts")
    assert RunDir(run_dir).read_metrics()["export"]["toy-ts"] == results["toy-ts"]


def test_a_registered_backend_is_a_latency_backend(toy_backend, tmp_path):
    """The bench's registry is the latency budget's too: the toy backend, registered above and nowhere else,
    times a latency table, calibrates the model and checks a plan measured whole."""
    from compressor import latency, models, surgery
    from compressor.budget import Budget, solve_widths

    assert "toy-eager" in latency.backend_names()
    graph = surgery.trace(models.create("conv4", 10, 1).eval(), torch.randn(2, 1, 28, 28))
    spec = latency.LatencySpec("toy-eager", 1, cache_dir=str(tmp_path), step=16, table_iters=2,
                               check_seconds=0.1, verbose=False)
    # no calibration: the plain sum of the table (the fit on a busy machine is the latency tests' concern)
    lat = latency.LatencyModel(graph, spec, round_to=8, max_ratio=0.9, device=torch.device("cpu"), measure=False)
    assert lat.table.measured and lat.device.type == "cpu"
    points = sum(len(e["in"]) * len(e["out"]) for e in lat.table.layers.values())
    assert len(toy_backend) >= points  # every table point was built by the toy backend
    budget = Budget("latency", 0.9, latency=lat)  # 0.9: a busy machine times tiny layers roughly
    solution = solve_widths(graph, budget, None, round_to=8, max_ratio=0.9)
    assert solution.fractions["latency"]["solves"] and 0 < solution.fraction <= 1.5
