"""Masking criteria on layouts beyond plain conv chains: concatenations (DenseNet) and
channels-last layers (ConvNeXt), and FFR on activations other than nn.ReLU.

Tiny hand-made models keep every test within seconds.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torchvision.ops.misc import Permute

from compressor import data as datasets
from compressor import surgery
from compressor.budget import Budget
from compressor.criteria import PlanRequest, configs_from, make_plan, masking
from compressor.criteria.ffr import FlowRecorder, channel_scores, flow_modules
from compressor.criteria.psap import GradientWatch
from compressor.criteria.subnet import Split
from compressor.train import TrainConfig

CPU = torch.device("cpu")
SHAPE = (3, 16, 16)


class DenseBlock(nn.Module):
    """DenseNet in small: conv -> BN -> ReLU, concatenated with its input, then BN over the wider map."""

    def __init__(self, classes=10, c=16):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.bn2, self.conv2 = nn.BatchNorm2d(2 * c), nn.Conv2d(2 * c, c, 3, padding=1, bias=False)
        self.bn3, self.fc = nn.BatchNorm2d(3 * c), nn.Linear(3 * c, classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        x = torch.cat([x, self.relu(self.bn1(self.conv1(x)))], 1)
        x = torch.cat([x, self.conv2(self.relu(self.bn2(x)))], 1)
        return self.fc(self.relu(self.bn3(x)).mean((2, 3)))


class LastBlock(nn.Module):
    """ConvNeXt in small: depthwise conv, Permute, nn.LayerNorm and nn.Linear on channels-last maps."""

    def __init__(self, classes=10, c=16, hidden=64):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.block = nn.Sequential(Permute([0, 2, 3, 1]), nn.LayerNorm(c), nn.Linear(c, hidden), nn.GELU(),
                                   nn.Linear(hidden, c), Permute([0, 3, 1, 2]))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(self.dw(x))
        return self.head(x.mean((2, 3)))


class SiluNet(nn.Module):
    """conv -> BN -> SiLU / ReLU6 / Hardswish, with a squeeze-and-excitation branch: no nn.ReLU at all."""

    def __init__(self, classes=10):
        super().__init__()
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.SiLU()
        self.c2, self.b2, self.a2 = nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 8, 1), nn.SiLU(), nn.Conv2d(8, 32, 1),
                                nn.Sigmoid())
        self.c3, self.b3, self.a3 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.Hardswish()
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.a2(self.b2(self.c2(self.a1(self.b1(self.c1(x))))))
        x = x * self.se(x)
        return self.fc(self.a3(self.b3(self.c3(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def tiny():
    return datasets.from_tensors("tiny", *datasets.synthetic(shape=SHAPE, n_train=40, n_test=8), val_fraction=0.2)


def _model(cls, **kwargs):
    torch.manual_seed(0)
    return cls(**kwargs)


OPTIONS = {"steps": 1, "step_epochs": 1, "ffr_epochs": 1, "population": 4, "generations": 1, "search_samples": 8,
           "levels": (0.5,)}


def _request(model, data, method, fraction=0.5):
    return PlanRequest(model, data.example_inputs(), Budget("macs", fraction), round_to=1, data=data,
                       train=TrainConfig(0, lr=0.01, batch_size=16))


def _config(method, **extra):
    """The method's settings from one flat set of small ones (each criterion takes those it declares)."""
    return configs_from(OPTIONS | ({"step_epochs": 0} if method == "smoea" else {}) | extra)[method]


def _masks(graph, plan):
    masks = {}
    for g in graph.groups:
        m = torch.zeros(g.width, dtype=torch.bool)
        m[plan.keep.get(g.name, list(range(g.width)))] = True
        masks[g.name] = m
    return masks


def test_carriers_place_a_group_in_the_wider_layers_after_a_concatenation():
    model = _model(DenseBlock)
    graph = surgery.trace(model, torch.zeros(1, *SHAPE))
    conv1 = graph.group("conv1")
    rows = {c.layer: c.index.tolist() for c in masking.carriers(graph, conv1)}
    assert rows["conv1"] == rows["bn1"] == list(range(16))
    assert rows["bn2"] == rows["bn3"] == list(range(16, 32))  # the second slice of the concatenations
    masks = masking.full_masks(graph)
    masks["conv1"][::2] = False
    masking.zero_masked(graph, masks)
    gamma = model.bn3.weight.detach()
    assert torch.count_nonzero(gamma[16:32:2]) == 0
    assert torch.count_nonzero(gamma[:16]) == 16 and torch.count_nonzero(gamma[17:32:2]) == 8


@pytest.mark.parametrize("cls", [DenseBlock, LastBlock])
def test_subnet_gates_equal_the_zeroed_model(tiny, cls):
    """SMOEA's gates (a layer-wide gate with ones outside the group's slice; the last dimension for
    channels-last layers) zero what ``zero_masked`` zeroes. Zeroed, not removed: with a LayerNorm over
    channels the two differ, so this compares with the zeroed model."""
    model = _model(cls).eval()
    x = torch.randn(4, *SHAPE)
    graph = surgery.trace(model, x[:1])
    masks = masking.full_masks(graph)
    for m in masks.values():
        m[1::3] = False
    split = Split(graph, graph.names())
    with torch.no_grad():
        gated = split.run(split.cut(x), {g: m.float() for g, m in masks.items()})
        masking.zero_masked(graph, masks)
        zeroed = model(x)
    torch.testing.assert_close(gated, zeroed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [DenseBlock, LastBlock])
def test_gradient_watch_reads_every_group(cls):
    """A consumer wider than the group (after a concatenation) or channels-last still reports the group."""
    model = _model(cls).train()
    x = torch.randn(4, *SHAPE)
    graph = surgery.trace(model, x[:1])
    inputs = []
    consumers = [model.conv2, model.fc] if cls is DenseBlock else [model.block[2], model.head]
    handles = [m.register_forward_pre_hook(lambda _m, a: inputs.append(a[0]) or a[0].retain_grad())
               for m in consumers]
    watch = GradientWatch(graph)
    model(x).sum().backward()
    watch.close()
    for h in handles:
        h.remove()
    means = watch.mean()
    for g in graph.groups:
        assert int(watch.steps[g.name]) >= 1, g.name
        assert means[g.name].shape == (g.width,) and bool((means[g.name] > 0).all())
    if cls is DenseBlock:  # conv1's channels are 16..31 of conv2's input and of fc's
        conv2_in, fc_in = inputs
        expected = (conv2_in.grad.abs().mean((0, 2, 3))[16:32] + fc_in.grad.abs().mean(0)[16:32]) / 2
        torch.testing.assert_close(means["conv1"], expected)
    else:  # the stem's channels are the last dimension of the first Linear's (N, H, W, C) input, and the head's
        linear_in, head_in = inputs
        expected = (linear_in.grad.abs().mean((0, 1, 2)) + head_in.grad.abs().mean(0)) / 2
        torch.testing.assert_close(means["stem"], expected)


@pytest.mark.parametrize("method", ["psap", "ffr", "smoea", "sensitivity"])
def test_concatenation_model_meets_the_budget_and_equals_the_pruned_one(tiny, method):
    model = _model(DenseBlock, c=64)  # one channel is about 1% of the MACs: the budget can land within 0.01
    x = tiny.example_inputs()
    dense = surgery.count(model, x)
    request = _request(model, tiny, method)
    plan = make_plan(method, request, _config(method))
    graph = request.traced()
    pruned = surgery.pruned_copy(model, plan, x).eval()
    kept = surgery.count(pruned, x).fraction_of(dense)["macs"]
    assert abs(kept - 0.5) <= 0.01, kept
    zeroed = copy.deepcopy(model).eval()
    zeroed_graph = surgery.trace(zeroed, x)
    masking.zero_masked(zeroed_graph, _masks(zeroed_graph, plan))
    batch = torch.randn(6, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(pruned(batch), zeroed(batch), rtol=1e-4, atol=1e-5)
    if method in ("psap", "smoea"):  # the criterion's own model is the masked one
        with torch.no_grad():
            torch.testing.assert_close(pruned(batch), model.eval()(batch), rtol=1e-4, atol=1e-5)
    assert graph is request.graph


@pytest.mark.parametrize("method", ["psap", "ffr", "smoea", "sensitivity"])
def test_channels_last_model_meets_the_budget(tiny, method):
    """No equality with the pruned model here: a LayerNorm over channels normalises over the zeroed
    channels too, so zeroing a channel is not the same as removing it."""
    model = _model(LastBlock, c=64, hidden=128)
    x = tiny.example_inputs()
    dense = surgery.count(model, x)
    plan = make_plan(method, _request(model, tiny, method), _config(method))
    kept = surgery.count(surgery.pruned_copy(model, plan, x), x).fraction_of(dense)["macs"]
    assert abs(kept - 0.5) <= 0.01, kept


def test_ffr_flow_follows_any_activation_and_skips_squeeze_excitation():
    model = _model(SiluNet).train()
    points = flow_modules(model)
    assert points == [model.a1, model.a2, model.a3]  # the SE branch's SiLU is left out
    recorder = FlowRecorder(model)
    model(torch.randn(2, *SHAPE))
    recorder.close()
    assert [tuple(f.shape[1:]) for f in recorder.features] == [(16, 16, 16), (32, 8, 8), (32, 8, 8)]


def test_ffr_reads_channels_last_points_channels_first():
    model = _model(LastBlock).train()
    recorder = FlowRecorder(model)
    model(torch.randn(2, *SHAPE))
    recorder.close()
    assert [tuple(f.shape) for f in recorder.features] == [(2, 64, 4, 4)]  # GELU's (N, H, W, C) output


def test_ffr_without_activation_modules_follows_the_norms():
    class Functional(nn.Module):  # as GoogLeNet's BasicConv2d: F.relu, no module
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.b1(self.c1(x)))
            return self.fc(torch.relu(self.b2(self.c2(x))).mean((2, 3)))

    model = _model(Functional)
    assert flow_modules(model) == [model.b1, model.b2]


@pytest.mark.parametrize("cls", [SiluNet, LastBlock])
def test_ffr_on_a_model_without_relu_meets_the_budget(tiny, cls):
    model = _model(cls)
    x = tiny.example_inputs()
    dense = surgery.count(model, x)
    request = _request(model, tiny, "ffr")
    plan = make_plan("ffr", request, _config("ffr"))
    kept = surgery.count(surgery.pruned_copy(model, plan, x), x).fraction_of(dense)["macs"]
    assert abs(kept - 0.5) <= 0.01, kept
    if len(flow_modules(model)) > 1:  # LastBlock's flow is its one GELU: no length
        assert request.report["ffr"]["history"][0]["ffr_length"] > 0
    scores = channel_scores(request.traced())
    assert all(s.shape == (g.width,) for g, s in zip(request.traced().groups, scores.values()))


class GroupedBlock(nn.Module):
    """A grouped conv (groups=4) between two plain ones: its input and output channels are constrained."""

    def __init__(self, classes=10):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.relu, self.fc = nn.ReLU(), nn.Linear(64, classes)

    def forward(self, x):
        x = self.relu(self.b2(self.c2(self.relu(self.b1(self.c1(x))))))
        return self.fc(self.relu(self.b3(self.c3(x))).mean((2, 3)))


@pytest.mark.parametrize("method", ["psap", "ffr", "smoea", "sensitivity"])
def test_grouped_convolution_plans_are_legal(tiny, method):
    """Every keep set goes through ``Group.choose`` (or is made legal, as SMOEA's bit flips and PSAP's
    swaps), so surgery accepts the plan and the zeroed model equals the pruned one."""
    model = _model(GroupedBlock)
    x = tiny.example_inputs()
    dense = surgery.count(model, x)
    request = _request(model, tiny, method)
    # psap swaps; smoea mutates
    plan = make_plan(method, request, _config(method, steps=2, protect_z=0.0, generations=2))
    graph = request.traced()
    assert all(getattr(g, "check", lambda _: None)(plan.keep[g.name]) is None
               for g in graph.groups if g.name in plan.keep)
    pruned = surgery.pruned_copy(model, plan, x).eval()
    kept = surgery.count(pruned, x).fraction_of(dense)["macs"]
    assert abs(kept - 0.5) <= 0.01, kept
    zeroed = copy.deepcopy(model).eval()
    zeroed_graph = surgery.trace(zeroed, x)
    masking.zero_masked(zeroed_graph, _masks(zeroed_graph, plan))
    batch = torch.randn(6, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(pruned(batch), zeroed(batch), rtol=1e-4, atol=1e-5)
