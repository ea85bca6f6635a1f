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


# Whole jobs: `compress run/compare/export/bench` end to end, torchrun processes, a served model, the model zoo.
# The rest are unit tests: `python -m pytest -m "not e2e"` runs only those; the README's command runs both.
E2E_FILES = {"test_cli.py", "test_distributed.py", "test_resume.py", "test_service.py", "test_stream.py",
             "test_zoo.py", "test_bench.py", "test_export.py", "test_quantize.py", "test_extending_backend.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in E2E_FILES:
            item.add_marker(pytest.mark.e2e)
