import copy
import json

import pytest
import torch
import torch.nn as nn

from compressor import data as datasets
from compressor import models, surgery
from compressor.budget import Budget
from compressor.cli import main
from compressor.criteria import PlanRequest, make_plan
from compressor.criteria.sensitivity import SensitivityConfig, analyze, ratios_from
from compressor.errors import CompressorError
from compressor.train import TrainConfig, fit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return datasets.load("synthetic", val_fraction=0.2)


@pytest.fixture(scope="module")
def small():
    """Few images, so that analysing a VGG stays within seconds on a CPU."""
    return datasets.from_tensors("small", *datasets.synthetic(n_train=320, n_test=64), val_fraction=0.2)


def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TwoPaths(nn.Module):
    """Path ``b`` is scaled to almost nothing before the head: damaging it cannot matter."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b = block(3, 16), block(16, 16), block(16, 16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.pool(torch.cat([self.a(h), 1e-4 * self.b(h)], 1)).flatten(1))


def test_irrelevant_layer_is_least_sensitive_and_pruned_most(data):
    torch.manual_seed(0)
    model = TwoPaths()
    fit(model, data, TrainConfig(epochs=6, lr=0.1, batch_size=32), CPU)
    x = data.example_inputs()
    graph = surgery.trace(model, x)
    analysis = analyze(model, graph, data, CPU)
    assert analysis["base_accuracy"] > 0.5
    sens = analysis["sensitiveness"]
    assert min(sens, key=sens.get) == "b.0" and abs(sens["b.0"]) < 0.01
    assert max(sens["a.0"], sens["stem.0"]) > 0.05  # the test can fail: the relevant paths must matter
    ratios = ratios_from(sens)
    assert max(ratios, key=ratios.get) == "b.0"
    plan = make_plan("sensitivity", PlanRequest(model, x, Budget("params", 0.6), round_to=4, data=data))
    widths = plan.widths()
    assert widths["b.0"] < widths["a.0"] and widths["b.0"] <= widths["stem.0"]


def test_table_has_a_row_per_group_and_level(small):
    data = small
    model = models.create("resnet20", 10, 3)
    x = data.example_inputs()
    graph = surgery.trace(model, x)
    analysis = analyze(model, graph, data, CPU, levels=(0.3, 0.6), mode="noise")
    assert len(analysis["rows"]) == len(graph.groups) * 2
    assert {(r["group"], r["level"]) for r in analysis["rows"]} == {(g, lv) for g in graph.names() for lv in (0.3, 0.6)}
    # the damage is undone: the model answers as before
    assert analyze(model, graph, data, CPU, levels=(0.5,))["base_accuracy"] == analysis["base_accuracy"]


@pytest.mark.parametrize("name, steps", [("conv4", 1), ("vgg11", 1), ("resnet20", 1), ("conv4", 2), ("resnet20", 2)])
def test_budget_is_met(small, name, steps):
    data = small
    torch.manual_seed(0)
    model = models.create(name, 10, 3)
    x = data.example_inputs()
    dense = surgery.count(model, x)
    request = PlanRequest(model, x, Budget("macs", 0.5), data=data)
    plan = make_plan("sensitivity", request, SensitivityConfig(steps=steps, step_epochs=1))
    kept = surgery.count(surgery.pruned_copy(model, plan, x), x).fraction_of(dense)["macs"]
    assert abs(kept - 0.5) <= 0.01
    assert len(request.report["sensitivity"].get("steps", [None])) == steps


def test_default_is_two_steps_and_one_under_a_latency_budget(small):
    """The default the Conv-4 / CIFAR-10 study chose (two steps), but one step where a latency budget needs it."""
    default = SensitivityConfig()
    assert default.steps_for("params") == default.steps_for("macs") == 2
    assert default.steps_for("latency") == 1 and SensitivityConfig(steps=3).steps_for("params") == 3
    default.check_budget("latency")  # the default adapts: no refusal
    with pytest.raises(CompressorError, match="sensitivity in one step"):
        SensitivityConfig(steps=2).check_budget("latency")
    torch.manual_seed(0)
    request = PlanRequest(models.create("conv4", 10, 3), small.example_inputs(), Budget("params", 0.5), data=small)
    make_plan("sensitivity", request)
    assert len(request.report["sensitivity"]["steps"]) == 2 and request.train_epochs == 1


def test_analyze_command_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--dataset", "synthetic", "--epochs", "1", "--finetune-epochs", "0", "--out", str(out)]) == 0
    assert main(["analyze", str(out), "--levels", "0.5", "--out", str(tmp_path / "an")]) == 0
    table = json.loads((tmp_path / "an" / "sensitivity.json").read_text())
    assert len(table["rows"]) == 4 and (tmp_path / "an" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "an" / "sensitivity.csv").read_text().splitlines()[0] == "group,width,level,mode,accuracy,drop"
    assert main(["analyze", str(out), "--levels", "1.5"]) == 2
    assert "levels must lie in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("step_epochs", [0, 1])
def test_training_between_steps_carries_into_the_result(small, step_epochs):
    """The steps' training was done on a pruned copy; its weights come back into the model the plan prunes."""
    torch.manual_seed(0)
    model = models.create("conv4", 10, 3)
    original, x = copy.deepcopy(model), small.example_inputs()
    request = PlanRequest(model, x, Budget("params", 0.5), data=small)
    plan = make_plan("sensitivity", request, SensitivityConfig(steps=2, step_epochs=step_epochs))
    assert request.train_epochs == step_epochs
    kept_now, kept_before = (surgery.pruned_copy(m, plan, x).state_dict() for m in (model, original))
    same = all(torch.equal(kept_now[k], kept_before[k]) for k in kept_now)
    assert same == (step_epochs == 0)
