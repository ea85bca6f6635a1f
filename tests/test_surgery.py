import copy

import pytest
import torch
import torch.nn as nn

from compressor import models, surgery
from compressor.budget import Budget, solve_widths
from compressor.criteria import PlanRequest, make_plan
from compressor.errors import BudgetError, CompressorError, TraceError
from compressor.plan import PruningPlan

from .conftest import make

BUDGETS = [Budget("macs", 0.5), Budget("macs", 0.25), Budget("params", 0.3)]


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
@pytest.mark.parametrize("name", models.available())
def test_l1_surgery_meets_budget_on_every_model(name, budget):
    model, x = make(name)
    dense_cost, dense_widths = surgery.count(model, x), surgery.trace(model, x).widths()
    plan = make_plan("l1", PlanRequest(model, x, budget))
    surgery.apply(model, plan, x)
    assert model(x).shape == (2, 10)
    kept = surgery.count(model, x).fraction_of(dense_cost)[budget.metric]
    assert abs(kept - budget.fraction) <= budget.tolerance, kept
    widths = surgery.trace(model, x).widths()
    assert widths == plan.widths()
    for group, width in widths.items():
        assert width % 8 == 0 or width == dense_widths[group], (group, width)
    assert any(widths[g] < dense_widths[g] for g in widths)


@pytest.mark.parametrize("name", ["vgg16", "resnet20", "conv4"])
def test_channels_last_survives_surgery(name):
    model, x = make(name)
    model.to(memory_format=torch.channels_last)
    plan = make_plan("l1", PlanRequest(model, x, Budget("macs", 0.5)))
    surgery.apply(model, plan, x)
    spatial = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert spatial and all(w.is_contiguous(memory_format=torch.channels_last) for w in spatial)
    assert all(not w.is_contiguous() for w in spatial if w.shape[1] > 1)


def test_plain_layout_stays_plain():
    model, x = make("vgg11")
    surgery.apply(model, make_plan("l1", PlanRequest(model, x, Budget("macs", 0.5))), x)
    assert all(m.weight.is_contiguous() for m in model.modules() if isinstance(m, nn.Conv2d))


def test_kept_channels_are_the_planned_ones():
    model, x = make("vgg11")
    graph = surgery.trace(model, x)
    first = graph.groups[0]
    keep = [1, 5, 9, 30, 31, 40, 50, 63]
    original = graph.module(first.name).weight.detach().clone()
    surgery.apply(model, PruningPlan({first.name: keep}), x)
    assert torch.equal(model.get_submodule(first.name).weight, original[keep])


def test_residual_groups_couple_the_add():
    model, x = make("resnet20")
    graph = surgery.trace(model, x)
    # the stem and every block's second conv and shortcut in stage 1 share one channel space
    stage1 = next(g for g in graph.groups if g.name == "stem.0")
    assert {"stages.0.0.conv2", "stages.0.2.conv2"} <= set(stage1.out_layers)
    assert len(graph.groups) == 12  # 3 stage spaces + 9 block-internal


def test_l1_keeps_the_largest_filters():
    model, x = make("conv4")
    conv = model.features[0][0]
    with torch.no_grad():
        conv.weight.mul_(0.01)
        conv.weight[[3, 7, 11, 20]] *= 1000.0
    plan = make_plan("l1", PlanRequest(model, x, Budget("macs", 0.4)))
    assert {3, 7, 11, 20} <= set(plan.keep["features.0.0"])


def test_random_is_seeded():
    model, x = make("vgg11")
    a = make_plan("random", PlanRequest(model, x, Budget("macs", 0.5), seed=3))
    b = make_plan("random", PlanRequest(model, x, Budget("macs", 0.5), seed=3))
    c = make_plan("random", PlanRequest(model, x, Budget("macs", 0.5), seed=4))
    assert a == b and a != c


def test_impossible_budget_reports_reachable_range():
    model, x = make("resnet20")
    with pytest.raises(BudgetError, match=r"reaches \[0\.\d+, 1\.0\]"):
        solve_widths(surgery.trace(model, x), Budget("macs", 0.001))


@pytest.mark.parametrize("fraction", [0.0, -0.2, 1.5])
def test_budget_outside_zero_one_is_refused(fraction):
    with pytest.raises(BudgetError, match="fraction"):
        Budget("macs", fraction)


@pytest.mark.parametrize("factory", ["torchvision.models:resnet18", "torchvision.models:mobilenet_v2"])
def test_user_models_from_torchvision(factory):
    model = models.create(factory, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    dense = surgery.count(model, x)
    plan = make_plan("l1", PlanRequest(model, x, Budget("macs", 0.5)))
    surgery.apply(model, plan, x)
    assert model(x).shape == (1, 10)
    assert abs(surgery.count(model, x).fraction_of(dense)["macs"] - 0.5) <= 0.01


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.weird = Weird()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.weird(self.conv(x)).mean((2, 3)))


class Weird(nn.Module):
    def forward(self, x):
        if x.requires_grad or not x.requires_grad:
            raise RuntimeError("data-dependent python control flow")
        return x


def test_untraceable_model_names_the_layer():
    with pytest.raises(TraceError, match="'weird'"):
        surgery.trace(Untraceable(), torch.randn(1, 3, 8, 8))


def test_plan_with_unknown_group_is_refused():
    model, x = make("conv4")
    with pytest.raises(Exception, match="does not have"):
        surgery.apply(model, PruningPlan({"nope": [0]}), x)


def test_tracing_leaves_batchnorm_statistics_alone():
    model, x = make("vgg11")
    model.train()
    before = copy.deepcopy(model.state_dict())
    surgery.trace(model, x)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shufflenet_refusal_names_the_channel_shuffle():
    import torchvision

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    with pytest.raises(TraceError, match=r"shuffles channels in 'stage2\.0'"):
        surgery.trace(model, torch.randn(1, 3, 32, 32))


def test_trace_and_surgery_under_inference_mode():
    model, x = make("resnet20")
    with torch.inference_mode():
        graph = surgery.trace(model, x)
        surgery.apply(model, PruningPlan.first_channels({g: w // 2 for g, w in graph.widths().items()}, graph),
                      x, graph)
    assert not any(p.is_inference() for p in model.parameters())
    model(x).sum().backward()  # still trainable outside inference mode


@pytest.mark.parametrize("name", ["conv4", "resnet20", "densenet"])
def test_write_back_puts_a_trained_pruned_copy_into_the_kept_positions(name):
    """A criterion that trains a pruned copy hands its training on: write_back, then pruning by the same
    plan, gives the trained copy exactly (residual adds and concatenations included)."""
    if name == "densenet":
        import torchvision

        model, x = torchvision.models.densenet121(num_classes=10).eval(), torch.randn(2, 3, 32, 32)
    else:
        model, x = make(name)
    plan = make_plan("random", PlanRequest(model, x, Budget("params", 0.5)))
    trained = surgery.pruned_copy(model, plan, x)
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for training: every value of the copy changes
        for t in trained.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.rand_like(t) + 0.001)
    before = copy.deepcopy(model)
    surgery.write_back(model, trained, plan, x)
    result = surgery.pruned_copy(model, plan, x)
    for (key, got), want in zip(result.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(got, want), key
    assert torch.equal(result.eval()(x), trained.eval()(x))
    dropped = [k for k, v in model.state_dict().items() if v.is_floating_point()
               and (v == before.state_dict()[k]).any()]
    assert dropped, "the pruned positions keep their old values"
    with pytest.raises(CompressorError, match="not this model pruned by this plan"):
        surgery.write_back(model, before, plan, x)
