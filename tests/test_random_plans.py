"""Property test: random legal plans on residual, depthwise, grouped and concatenating models.

Every plan must give the model you get by zeroing the dropped channels, survive a save
and load with identical logits, and export to ONNX with the same logits.
"""
import time

import torch
import torch.nn as nn

from compressor import checkpoint, models, surgery
from compressor.export import onnx
from compressor.plan import PruningPlan

from .test_grouped import TinyGrouped, assert_surgery_equals_zeroing, randomize_bn


class TinyDepthwise(nn.Module):
    """An inverted residual: expand, depthwise, project, with a skip connection."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(x.mean((2, 3)))


class TinyDense(nn.Module):
    """Two DenseNet-style layers: each concatenates its output to its input."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(12), nn.Conv2d(12, 4, 3, padding=1)
        self.bn3, self.fc = nn.BatchNorm2d(16), nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.conv0(x)
        x = torch.cat([x, self.conv1(torch.relu(self.bn1(x)))], 1)
        x = torch.cat([x, self.conv2(torch.relu(self.bn2(x)))], 1)
        return self.fc(torch.relu(self.bn3(x)).mean((2, 3)))


def tiny_grouped(num_classes=10):
    return TinyGrouped(num_classes)


def tiny_depthwise(num_classes=10):
    return TinyDepthwise(num_classes)


def tiny_dense(num_classes=10):
    return TinyDense(num_classes)


def resnet20(num_classes=10):
    return models.create("resnet20", num_classes, 3)


FACTORIES = ["tiny_grouped", "tiny_depthwise", "tiny_dense", "resnet20"]
SIZE = 16


def random_plan(graph, g):
    """Random legal widths (full now and then) and channels chosen from random scores."""
    keep = {}
    for group in graph.groups:
        widths = group.legal_widths()
        if torch.rand(1, generator=g).item() < 0.2:
            continue
        width = widths[int(torch.randint(len(widths), (1,), generator=g))]
        keep[group.name] = group.choose(torch.rand(group.width, generator=g), width)
    return PruningPlan(keep)


def test_random_plans(tmp_path):
    start, checked, g = time.perf_counter(), 0, torch.Generator().manual_seed(0)
    for name in FACTORIES:
        factory = f"{__name__}:{name}"
        for trial in range(8):
            torch.manual_seed(trial)
            model = randomize_bn(models.build(factory, num_classes=10), seed=trial)
            x = torch.randn(2, 3, SIZE, SIZE)
            graph = surgery.trace(model, x)
            plan = random_plan(graph, g)
            pruned = assert_surgery_equals_zeroing(model, x, plan, graph)
            with torch.no_grad():
                logits = pruned(x)
            spec = checkpoint.spec_for(pruned, factory, {"num_classes": 10}, [3, SIZE, SIZE], 10)
            path = checkpoint.save(pruned, spec, tmp_path / f"{name}-{trial}.pt")
            with torch.no_grad():
                assert torch.equal(checkpoint.load(path, trusted_factories=[factory])(x), logits), (name, plan.widths())
            runner = onnx.OnnxRuntimeModel(onnx.export(pruned, tmp_path / f"{name}-{trial}.onnx", x))
            torch.testing.assert_close(runner(x), logits, atol=1e-4, rtol=1e-4)
            checked += 1
    print(f"{checked} random plans checked in {time.perf_counter() - start:.1f}s")
    assert checked == 8 * len(FACTORIES)
