"""Grouped convolutions: surgery must give the model you get by zeroing the dropped channels."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from compressor import surgery
from compressor.budget import Budget, allowed_widths, solve_widths
from compressor.errors import CompressorError
from compressor.plan import PruningPlan


class TinyGrouped(nn.Module):
    """conv -> groups=2 conv -> groups=4 1x1 conv: unequal block layouts on one tensor."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, groups=2), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 16, 1, groups=4), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics, so that a wrong channel shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@torch.no_grad()
def zeroed(model, graph, plan):
    """A copy of ``model`` whose dropped channels output zero (in every out-side member)."""
    model = copy.deepcopy(model)
    for group in graph.groups:
        drop = sorted(set(range(group.width)) - set(plan.keep.get(group.name, range(group.width))))
        if not drop:
            continue
        for layer, side in group.members:
            index = group.channels_in(layer, side)
            module = model.get_submodule(layer)
            if side != "out" or index is None:
                continue
            rows = index[torch.tensor(drop)]
            if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                module.weight[rows] = 0
                if module.bias is not None:
                    module.bias[rows] = 0
    return model


def assert_surgery_equals_zeroing(model, x, plan, graph=None):
    graph = graph or surgery.trace(model, x)
    expected = zeroed(model, graph, plan).eval()(x)
    pruned = surgery.apply(copy.deepcopy(model), plan, x).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-4)
    return pruned


def test_constraints_of_a_groups_2_conv():
    model = randomize_bn(TinyGrouped())
    graph = surgery.trace(model, torch.randn(1, 3, 16, 16))
    conv1, conv2 = graph.group("conv1"), graph.group("conv2")
    assert conv1.mode == "units" and all(len(u) == 2 for u in conv1.units)  # same position in both groups
    assert conv1.legal_widths() == list(range(2, 33, 2))
    assert conv2.mode == "units"  # equal count per conv2 group, same position in conv3's four groups
    assert conv2.legal_widths() == list(range(4, 33, 4))
    assert allowed_widths(32, 8, 0.95, conv2) == [8, 16, 24, 32]
    assert allowed_widths(32, 3, 0.95, conv2) == [12, 24, 32]  # lcm(4, 3) = 12, and full


def test_asymmetric_plan_is_refused_before_touching_the_model():
    model = randomize_bn(TinyGrouped())
    x = torch.randn(2, 3, 16, 16)
    before = copy.deepcopy(model.state_dict())
    plan = PruningPlan({"conv1": list(range(24))})  # 16 from the first group, 8 from the second
    with pytest.raises(CompressorError, match="illegal plan"):
        surgery.apply(model, plan, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grouped_plan_equals_zeroing():
    torch.manual_seed(0)
    model = randomize_bn(TinyGrouped())
    x = torch.randn(2, 3, 16, 16)
    graph = surgery.trace(model, x)
    scores = {g.name: torch.rand(g.width) for g in graph.groups}
    plan = PruningPlan.from_scores(scores, {"conv1": 24, "conv2": 12}, graph)
    pruned = assert_surgery_equals_zeroing(model, x, plan, graph)
    assert pruned.conv2.groups == 2 and pruned.conv2.weight.shape[:2] == (12, 12)


def test_random_subsets_never_crash_surgery():
    model = randomize_bn(TinyGrouped())
    x = torch.randn(2, 3, 16, 16)
    graph = surgery.trace(model, x)
    g = torch.Generator().manual_seed(1)
    legal = 0
    for _ in range(30):
        keep = {n: sorted(torch.randperm(w, generator=g)[: int(torch.randint(1, w + 1, (1,), generator=g))].tolist())
                for n, w in graph.widths().items()}
        plan = PruningPlan(keep)
        try:  # either refused up front, or exactly the zeroed model
            assert_surgery_equals_zeroing(model, x, plan)
            legal += 1
        except CompressorError as exc:
            assert "illegal plan" in str(exc)
    assert legal < 30


def test_regnet_pruned_by_budget_equals_zeroing():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.regnet_x_400mf(num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    graph = surgery.trace(model, x)
    solution = solve_widths(graph, Budget("macs", 0.5))
    scores = {g.name: torch.rand(g.width) for g in graph.groups}
    plan = PruningPlan.from_scores(scores, solution.widths, graph)
    assert_surgery_equals_zeroing(model, x, plan, graph)


def test_choose_keeps_the_best_legal_set():
    model = TinyGrouped()
    graph = surgery.trace(model, torch.randn(1, 3, 8, 8))
    scores = torch.zeros(32)
    scores[:4] = 10.0  # plain top-4 would take four channels of conv2's first group
    scores[16 + 5] = 30.0
    assert graph.group("conv1").choose(scores, 4) == [0, 5, 16, 21]  # position 5 sums highest, then 0
    blocks = graph.group("conv3")  # conv3 (groups=4) outputs: keep as many of each of its 4 groups
    assert blocks.mode == "blocks" and 4 not in blocks.legal_widths()
    assert blocks.choose(torch.arange(16.0), 8) == [2, 3, 6, 7, 10, 11, 14, 15]
    with pytest.raises(CompressorError, match="cannot keep 6"):
        blocks.choose(torch.arange(16.0), 6)
    mixed = surgery.Group("g", 5, None, units=[[0], [1, 2], [3, 4]], mode="units")
    assert mixed.choose(torch.tensor([5.0, 1, 1, 3, 3]), 3) == [0, 3, 4]
