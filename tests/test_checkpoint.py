import pytest
import torch

import compressor
from compressor import checkpoint, models, surgery
from compressor.budget import Budget
from compressor.criteria import PlanRequest, make_plan
from compressor.errors import CheckpointError

from .conftest import input_shape, make


def pruned(name, fraction=0.4):
    model, x = make(name)
    surgery.apply(model, make_plan("l1", PlanRequest(model, x, Budget("macs", fraction))), x)
    return model, x


def spec(model, name, **kw):
    c = input_shape(name)[0]
    return checkpoint.spec_for(model, name, models.factory_kwargs(name, 10, c), list(input_shape(name)), 10,
                               normalization={"mean": [0.5] * c, "std": [0.25] * c}, **kw)


@pytest.mark.parametrize("name", ["conv4", "vgg16", "resnet20"])
def test_round_trip_gives_identical_outputs(tmp_path, name):
    model, x = pruned(name)
    path = checkpoint.save(model, spec(model, name), tmp_path / "m.pt")
    loaded, loaded_spec = compressor.load(path, with_spec=True)
    assert torch.equal(model.eval()(x), loaded(x))
    assert loaded_spec.widths == surgery.trace(model, x).widths()
    assert loaded_spec.normalization["std"][0] == 0.25


def test_file_holds_no_pickled_code(tmp_path):
    model, _ = pruned("conv4")
    path = checkpoint.save(model, spec(model, "conv4"), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)  # raises if anything but tensors/containers is inside
    assert set(payload) == {"format", "spec", "state_dict"} and isinstance(payload["spec"], str)


def test_model_outside_the_registry_round_trips(tmp_path):
    name = "torchvision.models:mobilenet_v2"
    model = models.create(name, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    surgery.apply(model, make_plan("l1", PlanRequest(model, x, Budget("params", 0.5))), x)
    s = checkpoint.spec_for(model, name, models.factory_kwargs(name, 10, 3), [3, 64, 64], 10)
    path = checkpoint.save(model, s, tmp_path / "mb.pt")
    assert torch.equal(model(x), compressor.load(path)(x))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        compressor.load(tmp_path / "absent.pt")


def test_corrupt_file(tmp_path):
    model, _ = pruned("conv4")
    path = checkpoint.save(model, spec(model, "conv4"), tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        compressor.load(path)


def test_foreign_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a compressor checkpoint"):
        compressor.load(path)


def test_weights_that_do_not_match_the_spec(tmp_path):
    model, _ = pruned("conv4")
    s = spec(model, "conv4")
    s.widths = {k: v + 8 for k, v in s.widths.items()}  # claims wider layers than the weights have
    path = checkpoint.save(model, s, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        compressor.load(path)


def test_no_partial_file_after_a_failed_save(tmp_path, monkeypatch):
    model, _ = pruned("conv4")

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save(model, spec(model, "conv4"), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []
