"""Model zoo: every criterion on torchvision classifiers of every layout the library claims.

Residual (ResNet-18), depthwise + inverted residual + Hardswish + squeeze-excitation
(MobileNetV3-Small), grouped convs (RegNetX-400MF, ResNeXt-50), concatenations (DenseNet-121,
GoogLeNet), squeeze-excitation + SiLU (EfficientNet-B0), LayerNorm on channels-last maps
(ConvNeXt-Tiny), and a channel shuffle (ShuffleNetV2), which Torch-Pruning cannot trace.

Random weights, 32x32 inputs, a handful of random images and every criterion at its smallest
settings: the point is that each pair either gives a correct pruned model at the budget (equal
to the zeroed dense model, round-tripping through a checkpoint and ONNX Runtime) or refuses
once and clearly. Big models and slow criteria are marked ``slow``: ``pytest -m "not slow"``
keeps one cheap representative of each layout.
"""
import copy

import pytest
import torch
import torchvision

import compressor
from compressor import checkpoint, surgery
from compressor import data as datasets
from compressor.budget import Budget
from compressor.criteria import PlanRequest, configs_from, make_plan, masking
from compressor.errors import TraceError
from compressor.export import onnx
from compressor.train import TrainConfig

from .test_grouped import randomize_bn
from .test_masking_layouts import _masks

SIZE = 32  # every model here accepts 32x32 (ConvNeXt and the stride-32 models end at 1x1)
CRITERIA = ["l1", "random", "sensitivity", "psap", "ffr", "smoea"]
SLOW_CRITERIA = {"sensitivity", "psap", "ffr", "smoea"}  # they train or search: seconds to a minute each

# name: (factory kwargs besides num_classes, slow for every criterion)
MODELS = {
    "resnet18": ({}, False),
    "mobilenet_v3_small": ({}, False),
    "regnet_x_400mf": ({}, False),
    "resnext50_32x4d": ({}, True),
    "densenet121": ({}, True),
    "googlenet": ({"aux_logits": False, "init_weights": False}, False),
    "efficientnet_b0": ({}, False),
    "convnext_tiny": ({}, True),
}
# the cheap representatives of each layout that stay in the default (not slow) run, with a slow criterion
FAST_PAIRS = {("mobilenet_v3_small", "sensitivity"), ("googlenet", "psap"), ("regnet_x_400mf", "smoea"),
              ("efficientnet_b0", "ffr")}
# models whose LayerNorm normalises over channels: zeroing a channel is not removing it
LAYERNORM_OVER_CHANNELS = {"convnext_tiny"}

OPTIONS = {"levels": (0.5,), "steps": 1, "step_epochs": 1, "ffr_epochs": 1, "population": 4, "generations": 1,
           "group_size": 64, "search_samples": 32}


def _cases():
    for name, (_, slow) in MODELS.items():
        for method in CRITERIA:
            heavy = slow or (method in SLOW_CRITERIA and (name, method) not in FAST_PAIRS)
            yield pytest.param(name, method, id=f"{name}-{method}", marks=[pytest.mark.slow] if heavy else [])


@pytest.fixture(scope="module")
def zoo_data():
    """64 random uint8 images: 48 to train on, 16 to validate (SMOEA scores on them)."""
    g = torch.Generator().manual_seed(0)
    train_x = torch.randint(0, 256, (64, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    test_x = torch.randint(0, 256, (16, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    classes = [f"class{i}" for i in range(10)]
    return datasets.from_tensors("zoo", train_x, torch.arange(64) % 10, test_x, torch.arange(16) % 10, classes,
                                 val_fraction=0.25)


def _build(name):
    """Random weights, and BatchNorm statistics that are not the identity, so a wrong channel shows."""
    torch.manual_seed(0)
    kwargs, _ = MODELS.get(name, ({}, False))
    return randomize_bn(getattr(torchvision.models, name)(weights=None, num_classes=10, **kwargs))


def _request(model, data, method):
    return PlanRequest(model, data.example_inputs(), Budget("macs", 0.5), round_to=8, data=data,
                       train=TrainConfig(0, lr=0.01, batch_size=16))


def _plan(method, request):
    """The method's plan with the small settings (each criterion takes the OPTIONS it declares)."""
    config = configs_from(OPTIONS | ({"step_epochs": 0} if method == "smoea" else {}))[method]
    return make_plan(method, request, config)


@pytest.mark.parametrize("name, method", list(_cases()))
def test_zoo(zoo_data, tmp_path, name, method):
    model = _build(name)
    x = zoo_data.example_inputs()
    dense = surgery.count(model, x)
    request = _request(model, zoo_data, method)
    plan = _plan(method, request)
    model.eval()  # the dense model after the criterion (which may have trained it)
    pruned = surgery.pruned_copy(model, plan, x).eval()

    # (1) the budget
    kept = surgery.count(pruned, x).fraction_of(dense)["macs"]
    assert abs(kept - 0.5) <= 0.01, kept

    batch = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = pruned(batch)
    assert logits.shape == (4, 10) and bool(torch.isfinite(logits).all())

    # (2) removing the dropped channels is zeroing them. Not with a LayerNorm over channels (ConvNeXt): its mean
    # and variance count the zeroed channels too, so the zeroed model is not the pruned one; there the check is
    # only that the pruned model runs and gives finite logits (above).
    if name not in LAYERNORM_OVER_CHANNELS:
        zeroed = copy.deepcopy(model).eval()
        graph = surgery.trace(zeroed, x)
        masking.zero_masked(graph, _masks(graph, plan))
        with torch.no_grad():
            torch.testing.assert_close(logits, zeroed(batch), rtol=1e-4, atol=1e-4)

    # (3) the checkpoint round-trips
    kwargs, _ = MODELS[name]
    spec = checkpoint.spec_for(pruned, f"torchvision.models:{name}", {"num_classes": 10, **kwargs},
                               [3, SIZE, SIZE], 10)
    path = checkpoint.save(pruned, spec, tmp_path / f"{name}.pt")
    with torch.no_grad():
        assert torch.equal(compressor.load(path)(batch), logits)

    # (4) ONNX Runtime agrees
    runner = onnx.OnnxRuntimeModel(onnx.export(pruned, tmp_path / f"{name}.onnx", x), "cpu", threads=1)
    scale = max(float(logits.abs().max()), 1e-6)
    diff = float((runner(batch) - logits).abs().max())
    assert diff <= 1e-3 * scale, (diff, scale)


@pytest.mark.parametrize("method", CRITERIA)
def test_channel_shuffle_is_refused_once_and_clearly(zoo_data, method):
    model = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10)
    with pytest.raises(TraceError, match=r"shuffles channels in 'stage2\.0'.*ShuffleNet-style models cannot be pruned"):
        _plan(method, _request(model, zoo_data, method))
