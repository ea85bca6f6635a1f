import pytest
import torch.nn as nn

from compressor import models
from compressor.errors import CompressorError

from .conftest import make


@pytest.mark.parametrize("name", models.available())
def test_every_registered_model_runs(name):
    model, x = make(name, num_classes=7)
    assert model(x).shape == (2, 7)


def test_registry_lists_the_documented_models():
    assert set(models.available()) >= {"conv4", "vgg11", "vgg13", "vgg14", "vgg16", "vgg19",
                                       "resnet18", "resnet34", "resnet20", "resnet56"}


def test_vgg14_and_vgg16_share_the_body_and_differ_in_the_head():
    v14, v16 = models.create("vgg14"), models.create("vgg16")
    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]  # noqa: E731
    linears = lambda m: [c.out_features for c in m.modules() if isinstance(c, nn.Linear)]  # noqa: E731
    assert convs(v14) == convs(v16) and len(convs(v14)) == 13
    assert linears(v14) == [10] and linears(v16) == [512, 10]


def test_resnet56_has_56_weighted_layers_on_its_main_path():
    m = models.create("resnet56")
    convs = [n for n, c in m.named_modules() if isinstance(c, nn.Conv2d) and "shortcut" not in n]
    assert len(convs) + 1 == 56


def test_factory_path_is_accepted():
    m = models.create("torchvision.models:resnet18", num_classes=5)
    assert m.fc.out_features == 5


@pytest.mark.parametrize("name, words", [
    ("vgg17", "unknown model 'vgg17'"),
    ("no_such_pkg.x:f", "cannot import"),
    ("torchvision.models:nope", "no callable"),
])
def test_bad_model_names_say_what_is_wrong(name, words):
    with pytest.raises(CompressorError, match=words):
        models.create(name)
