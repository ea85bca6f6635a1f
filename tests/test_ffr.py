import math

import pytest
import torch

from compressor import data as datasets
from compressor import models, surgery
from compressor.budget import Budget
from compressor.criteria import PlanRequest, make_plan
from compressor.criteria.ffr import FFRConfig, FlowRecorder, channel_scores, flow_terms, match, regularised
from compressor.train import TrainConfig, fit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small():
    return datasets.from_tensors("small", *datasets.synthetic(n_train=320, n_test=64), val_fraction=0.2)


def test_terms_match_hand_computation():
    x1 = torch.zeros(2, 1, 2, 2)
    x2 = torch.ones(2, 1, 2, 2)
    x3 = torch.tensor([[3.0, 4.0], [6.0, 8.0]]).reshape(2, 2, 1, 1)
    x1[1], x2[1] = 0.0, 2.0  # the second image is the first scaled by 2
    length, curvature = flow_terms([x1, x2, x3])
    a, b, c = match(x1, x2, x3)
    assert a.shape == b.shape == c.shape == (2, 2, 1, 1) and b[0].flatten().tolist() == [1.0, 0.0]
    # image 1: |x2 - x1| rms = 1; x2 pooled to 1x1 and padded to [1, 0] vs [3, 4]: rms of [2, 4] = sqrt(10)
    # curvature: [3, 4] - 2 [1, 0] + [0, 0] = [1, 4]: rms sqrt(17 / 2); image 2 doubles every value
    assert length.item() == pytest.approx(1.5 * (1 + math.sqrt(10)))
    assert curvature.item() == pytest.approx(1.5 * math.sqrt(17 / 2))


def test_straight_evenly_spaced_flow_has_no_curvature():
    start, step = torch.randint(-5, 5, (3, 4, 6, 6)).float(), torch.randint(-3, 3, (3, 4, 6, 6)).float()
    flow = [start + i * step for i in range(5)]
    length, curvature = flow_terms(flow)
    assert abs(curvature.item()) < 1e-9
    assert length.item() == pytest.approx(4 * (torch.linalg.vector_norm(step.flatten(1), dim=1) / 12).mean().item())


def test_penalty_gradients_reach_the_weights():
    model = models.create("conv4", 10, 3).train()
    recorder = FlowRecorder(model)
    model(torch.randn(4, 3, 32, 32))
    assert len(recorder.features) == 4
    length, curvature = flow_terms(recorder.features)
    (length + curvature).backward()
    recorder.close()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in convs)


def _train(data, length, curvature):
    torch.manual_seed(0)
    model = models.create("conv4", 10, 3)
    with regularised(model, length, curvature, warmup=0.2) as hooks:
        history = fit(model, data, TrainConfig(epochs=4, lr=0.05, batch_size=32), CPU, hooks=hooks)
    graph = surgery.trace(model, data.example_inputs())
    return torch.cat(list(channel_scores(graph).values())), history


def test_ffr_lowers_bn_scales_against_plain_training(small):
    plain, plain_history = _train(small, 0.0, 0.0)
    regular, history = _train(small, 5.0, 5.0)
    assert plain_history[-1]["ffr_length"] == 0.0 and history[-1]["ffr_length"] > 0
    assert {"ffr_length", "ffr_curvature"} <= set(history[0])
    assert regular.mean() < 0.8 * plain.mean(), (regular.mean(), plain.mean())


@pytest.mark.parametrize("name", ["conv4", "vgg11", "resnet20"])
def test_budget_is_met(small, name):
    torch.manual_seed(0)
    model = models.create(name, 10, 3)
    x = small.example_inputs()
    dense = surgery.count(model, x)
    request = PlanRequest(model, x, Budget("macs", 0.25), data=small)
    plan = make_plan("ffr", request, FFRConfig(epochs=1))
    kept = surgery.count(surgery.pruned_copy(model, plan, x), x).fraction_of(dense)["macs"]
    assert abs(kept - 0.25) <= 0.01
    report = request.report["ffr"]
    assert report["history"][0]["ffr_length"] > 0 and 0 <= report["near_zero_share"]["all"] <= 1


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_group_score_without_penalty_or_floor_is_torch_prunings_global_group_l1(small, fraction):
    """The default score ranks and allocates as the best peer does; the penalty epochs and the floor are FFR's own."""
    torch.manual_seed(0)
    model = models.create("vgg11", 10, 3)
    x = small.example_inputs()
    ffr_request = PlanRequest(model, x, Budget("params", fraction), data=small)
    ffr_plan = make_plan("ffr", ffr_request, FFRConfig(epochs=0, floor=0))
    peer_plan = make_plan("tp-l1-global", PlanRequest(model, x, Budget("params", fraction)))
    assert FFRConfig().score == "group"
    assert {g: list(k) for g, k in ffr_plan.keep.items()} == {g: list(k) for g, k in peer_plan.keep.items()}
