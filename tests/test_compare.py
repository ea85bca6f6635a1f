"""compress compare: equal epochs, resumable cells, the statistics, the peers' budgets, distillation, FFR's floor."""
from __future__ import annotations

import json
import math

import pytest
import torch

from compressor import compare as study
from compressor import criteria, models, surgery
from compressor.budget import Budget
from compressor.cli import main
from compressor.data import load
from compressor.errors import CompressorError
from compressor.pipeline import RunConfig

TINY = dict(model="conv4", dataset="synthetic", round_to=4, batch_size=64)
SMALL = {"ffr_epochs": 1, "steps": 2, "step_epochs": 1, "population": 4, "generations": 1, "search_samples": 64,
         "group_size": 2}


def _study(tmp_path, methods=("l1", "random", "ffr", "psap"), seeds=(0, 1), **options):
    base = RunConfig(**TINY, epochs=1, pruning_epochs=2)
    return study.compare(base, list(methods), [("params", 0.3)], list(seeds), tmp_path / "s",
                         configs=criteria.configs_from(SMALL | options))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    return tmp, _study(tmp)


@pytest.mark.e2e
def test_equal_epochs_across_methods(finished):
    _, result = finished
    cells = result["cells"]
    assert {c["status"] for c in cells} == {"complete"}
    after = {c["epochs"]["criterion"] + c["epochs"]["finetune"] for c in cells}
    assert after == {2}  # every cell trains exactly --pruning-epochs after the dense model
    spent = {c["method"]: c["epochs"]["criterion"] for c in cells}
    assert spent == {"l1": 0, "random": 0, "ffr": 1, "psap": 2}  # the criterion's own training is counted


@pytest.mark.e2e
def test_outputs_and_cells_are_run_directories(finished):
    tmp, result = finished
    out = tmp / "s"
    assert (out / "compare.png").stat().st_size > 0
    md = (out / "compare.md").read_text()
    assert "| params:0.3 | ffr | 2 |" in md and "(reference)" in md
    saved = json.loads((out / "compare.json").read_text())
    assert len(saved["cells"]) == 8 and saved["summary"]
    for cell in saved["cells"]:
        assert (out / "cells" / cell["cell"] / "pruned.pt").is_file()
        assert (out / "cells" / cell["cell"] / "metrics.json").is_file()
        assert abs(cell["kept"]["params"] - 0.3) <= 0.01


@pytest.mark.e2e
def test_resume_skips_finished_cells(finished, monkeypatch):
    tmp, result = finished
    out = tmp / "s"
    # a study killed while one cell ran: that cell has no metrics.json yet
    (out / "cells" / "psap-params0.3-s1" / "metrics.json").unlink()
    ran = []
    real = study.run

    def counting(config):
        ran.append((config.method, config.seed))
        return real(config)

    monkeypatch.setattr(study, "run", counting)
    again = _study(tmp)
    assert ran == [("psap", 1)]  # neither the dense model nor any finished cell is redone
    assert [c["accuracy"] for c in again["cells"] if c["cell"] != "psap-params0.3-s1"] == \
        [c["accuracy"] for c in result["cells"] if c["cell"] != "psap-params0.3-s1"]


@pytest.mark.e2e
def test_a_study_refuses_other_shared_settings(finished):
    tmp, _ = finished
    with pytest.raises(CompressorError, match="other settings"):
        study.compare(RunConfig(**{**TINY, "round_to": 8}, epochs=1, pruning_epochs=2), ["l1"], [("params", 0.3)],
                      [0], tmp / "s")
    with pytest.raises(CompressorError, match="ffr's settings"):
        _study(tmp, ffr_epochs=2)


@pytest.mark.e2e
def test_criterion_needing_more_epochs_than_given_fails_its_cell(tmp_path):
    with pytest.raises(CompressorError, match="1 cell"):
        _study(tmp_path, methods=("psap",), seeds=(0,), steps=3)
    md = (tmp_path / "s" / "compare.md").read_text()
    assert "psap-params0.3-s0" in md and "more than --pruning-epochs 2" in md


def test_paired_difference_on_hand_made_numbers():
    ref = {0: 0.80, 1: 0.82, 2: 0.81}
    better = {0: 0.83, 1: 0.84, 2: 0.85}  # differences 0.03, 0.02, 0.04
    d = study.paired_difference(better, ref)
    assert d["mean"] == pytest.approx(0.03)
    assert d["std"] == pytest.approx(0.01)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2 dof)
    assert (d["low"], d["high"]) == (pytest.approx(0.03 - half), pytest.approx(0.03 + half))
    assert d["verdict"] == "better"
    assert study.paired_difference({0: 0.7, 1: 0.9, 2: 0.8}, ref)["verdict"] == "tie"
    assert study.paired_difference({0: 0.70, 1: 0.71, 2: 0.72}, ref)["verdict"] == "worse"
    assert study.paired_difference({0: 0.9}, ref) is None  # one common seed: no interval
    assert study.mean_std([0.5, 0.7]) == (pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))


def test_summary_rows_pair_by_seed():
    def cell(method, seed, acc):
        return {"status": "complete", "method": method, "metric": "params", "fraction": 0.1, "seed": seed,
                "accuracy": {"finetuned": acc, "pruned": acc / 2}, "kept": {"macs": 0.2, "params": 0.1},
                "epochs": {"criterion": 1, "finetune": 4}, "seconds": 1.0}

    cells = [cell("l1", 0, 0.5), cell("l1", 1, 0.6), cell("x", 1, 0.65), cell("x", 0, 0.55)]
    rows = {r["method"]: r for r in study.summarize(cells)}
    assert rows["l1"]["vs_reference"] is None
    assert rows["x"]["vs_reference"]["mean"] == pytest.approx(0.05)
    assert rows["x"]["vs_reference"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert rows["x"]["epochs"] == [(1, 4)]


@pytest.mark.parametrize("text, error", [("params", "metric:fraction"), ("flops:0.1", "metric:fraction"),
                                         ("params:x", "not a number"), ("params:1.5", "--budgets"), ("", "at least")])
def test_bad_budgets(text, error):
    with pytest.raises(CompressorError, match=error):
        study.parse_budgets(text)


def test_methods_and_seeds_parsing(capsys):
    assert study.parse_methods("ffr") == ["l1", "random", "ffr"]
    assert "added l1" in capsys.readouterr().out
    assert study.parse_seeds("3") == [0, 1, 2] and study.parse_seeds("4,7") == [4, 7]
    for bad in ("x", "0", "1,1", "-1,2"):
        with pytest.raises(CompressorError):
            study.parse_seeds(bad)
    with pytest.raises(CompressorError, match="unknown method"):
        study.parse_methods("l1,nope")


def test_cli_refuses_before_work(tmp_path, capsys):
    assert main(["compare", "--dataset", "synthetic", "--budgets", "params:2", "--pruning-epochs", "1",
                 "--out", str(tmp_path / "s")]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("method", ["tp-l1", "tp-l1-global", "tp-bn", "tp-taylor", "tp-lamp"])
@pytest.mark.parametrize("metric, fraction", [("params", 0.3), ("macs", 0.5)])
def test_torch_pruning_methods_meet_the_budget(method, metric, fraction):
    data = load("synthetic", None, 0.1, 0)
    model = models.build("resnet20", num_classes=data.num_classes)
    x = data.example_inputs()
    dense = surgery.count(model, x)
    request = criteria.PlanRequest(model, x, Budget(metric, fraction), round_to=4, data=data)
    plan = criteria.make_plan(method, request)
    surgery.apply(model, plan, x)
    kept = getattr(surgery.count(model, x), metric) / getattr(dense, metric)
    assert abs(kept - fraction) <= 0.01
    assert request.train_epochs == 0  # the peers score; they do not train


def test_distillation_changes_the_loss_and_is_off_by_default():
    from compressor.train import TrainConfig, distillation_loss, fit

    assert TrainConfig(1).distill == 0.0 and RunConfig().distill == 0.0
    data = load("synthetic", None, 0.1, 0)
    teacher = models.build("conv4", num_classes=data.num_classes, in_channels=3)

    def one_epoch(distill):
        torch.manual_seed(0)
        student = models.build("conv4", num_classes=data.num_classes, in_channels=3)
        return fit(student, data, TrainConfig(1, lr=0.01, batch_size=64, distill=distill), torch.device("cpu"),
                   teacher=teacher)[0]

    plain, distilled = one_epoch(0.0), one_epoch(0.5)
    assert "distill" not in plain and distilled["distill"] > 0
    assert plain["loss"] != pytest.approx(distilled["loss"])
    logits = torch.randn(8, 10)
    assert distillation_loss(logits, logits, 4.0) == pytest.approx(0.0, abs=1e-5)  # same logits: nothing to learn
    assert distillation_loss(logits, torch.randn(8, 10), 4.0) > 0
    with pytest.raises(CompressorError, match="teacher"):
        fit(teacher, data, TrainConfig(1, distill=0.5), torch.device("cpu"))


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_ffr_allocation_keeps_every_group_above_its_floor(fraction):
    from compressor.budget import global_widths, solve_widths
    from compressor.criteria.ffr import floor_widths

    model = models.build("vgg11", num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    graph = surgery.trace(model, x)
    budget = Budget("params", fraction)
    # scores that would starve the first layers under one raw threshold: tiny scales early, large late
    scores = {g.name: torch.rand(g.width) * (10.0 ** i) for i, g in enumerate(graph.groups)}
    floors = floor_widths(graph, budget, 8, 0.95, 0.5)
    start = global_widths(graph, scores, budget, 8, 0.95, floors)
    ratios = {g: 1 - start[g] / graph.group(g).width for g in start}
    widths = solve_widths(graph, budget, ratios, 8, 0.95, floors).widths
    for name, floor in floors.items():
        assert widths[name] >= floor and start[name] >= floor
    raw = global_widths(graph, scores, budget, 8, 0.95, normalise=False)
    assert raw[graph.groups[0].name] < floors[graph.groups[0].name]  # what the floor prevents


def test_cells_keep_the_dense_models_split(tmp_path, monkeypatch):
    """Cell seeds move training; the train/validation split stays the one the dense model was trained on."""
    seen = []

    def fake_run(config):
        seen.append((config.seed, config.split_seed))
        raise CompressorError("stop here")

    monkeypatch.setattr(study, "run", fake_run)
    dense = tmp_path / "dense.pt"
    dense.write_bytes(b"a checkpoint")
    with pytest.raises(CompressorError, match="2 cell"):
        study.compare(RunConfig(**TINY, checkpoint=str(dense), pruning_epochs=1, seed=7), ["l1"], [("params", 0.3)],
                      [3, 4], tmp_path / "s")
    assert seen == [(3, 7), (4, 7)]


def test_latency_budgets_beside_mac_budgets(tmp_path, monkeypatch):
    """--budgets latency:F: every latency cell shares one latency model of the dense model (measured once, passed
    explicitly), each cell's plan is measured whole, and the table shows the measured latency beside MACs."""
    from compressor import latency

    built = []
    real = latency.LatencyModel

    def counted(*args, **kwargs):
        built.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(latency, "LatencyModel", counted)
    base = RunConfig(**TINY, epochs=1, pruning_epochs=1, latency_step=16, latency_cache=str(tmp_path / "cache"))
    result = study.compare(base, ["l1", "random"], [("macs", 0.5), ("latency", 0.7)], [0], tmp_path / "s")
    cells = {c["cell"]: c for c in result["cells"]}
    assert {c["status"] for c in cells.values()} == {"complete"}
    assert len(built) == 1 and built[0].backend == "ort-cpu"  # one model for every latency cell
    for method in ("l1", "random"):
        lat_cell = cells[f"{method}-latency0.7-s0"]
        assert 0 < lat_cell["kept"]["latency"] <= 1.5 and cells[f"{method}-macs0.5-s0"]["kept"]["latency"] is None
        metrics = json.loads((tmp_path / "s" / "cells" / f"{method}-latency0.7-s0" / "metrics.json").read_text())
        assert metrics["latency"]["measured_ms"] > 0 and metrics["budget"]["metric"] == "latency"
    table = (tmp_path / "s" / "compare.md").read_text()
    assert "kept latency (measured)" in table and "| latency:0.7 | l1 |" in table
    with pytest.raises(CompressorError, match="--latency-backend"):
        study.compare(RunConfig(**TINY, epochs=1, pruning_epochs=1, latency_backend="nope"), ["l1"],
                      [("latency", 0.5)], [0], tmp_path / "t")
