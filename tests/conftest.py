import pytest
import torch

from compressor import models


def input_shape(name: str) -> tuple[int, int, int]:
    return (1, 28, 28) if name == "conv4" else (3, 32, 32)


@pytest.fixture
def tiny_inputs():
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


def make(name: str, num_classes: int = 10):
    torch.manual_seed(0)
    c, h, w = input_shape(name)
    model = models.create(name, num_classes, c).eval()
    return model, torch.randn(2, c, h, w)
