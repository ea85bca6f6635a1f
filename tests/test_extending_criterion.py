"""Adding a criterion is one file: its typed config and its function, registered together.

Everything below lives in this test file alone; the CLI's option group, the pipeline and
`compress compare` pick the criterion up from the registry (the README's "Extending" section).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from compressor import criteria
from compressor.budget import Budget, solve_widths
from compressor.cli import main
from compressor.criteria import CriterionConfig, PlanRequest, make_plan, option, register
from compressor.errors import CompressorError
from compressor.models import create
from compressor.plan import PruningPlan
from compressor.surgery import count, pruned_copy


@dataclass(frozen=True)
class ToyConfig(CriterionConfig):
    """Toy: keep the channels whose BatchNorm shift is largest, to a power."""

    power: float = option(1.0, "exponent on |beta|", flag="--toy-power", low=0, low_open=True)


def toy(request: PlanRequest, config: ToyConfig) -> PruningPlan:
    graph = request.traced()
    widths = solve_widths(graph, request.budget, None, request.round_to, request.max_ratio).widths
    scores = {}
    for group in graph.groups:
        bn = next(m for m in graph.model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                  and m.num_features == group.width)
        scores[group.name] = bn.bias.detach().abs() ** config.power
    request.report["toy"] = {"power": config.power}
    return PruningPlan.from_scores(scores, widths, graph)


@pytest.fixture
def registered():
    register("toy", config=ToyConfig)(toy)
    yield
    criteria.CRITERIA.remove("toy")


def test_the_api_takes_the_typed_config(registered):
    model = create("conv4", 10, 3)
    x = torch.randn(1, 3, 32, 32)
    request = PlanRequest(model, x, Budget("params", 0.5), round_to=4)
    plan = make_plan("toy", request, ToyConfig(power=2.0))
    kept = count(pruned_copy(model, plan, x), x).params / count(model, x).params
    assert abs(kept - 0.5) <= 0.01 and request.report["toy"] == {"power": 2.0}
    with pytest.raises(CompressorError, match="--toy-power must be greater than 0"):
        ToyConfig(power=0)


@pytest.mark.e2e
def test_the_cli_builds_its_option_group_from_the_registry(registered, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "--dataset", "synthetic", "--method", "toy", "--toy-power", "3", "--epochs", "0",
                 "--finetune-epochs", "0", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["criterion"]["toy"] == {"power": 3.0} and metrics["config"]["criterion"] == {"power": 3.0}
    assert main(["run", "--dataset", "synthetic", "--method", "toy", "--toy-power", "-1", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "--toy-power must be greater than 0, got -1.0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "toy criterion" in capsys.readouterr().out
