import pytest
import torch

import compressor
from compressor import checkpoint, models, surgery
from compressor.budget import Budget
from compressor.criteria import PlanRequest, make_plan
from compressor.errors import CheckpointError
from compressor.plan import PruningPlan

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


def test_depthwise_group_cut_to_one_channel_reloads(tmp_path):
    name = "torchvision.models:mobilenet_v2"
    model = models.create(name, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = surgery.trace(model, x)
    group = graph.group("features.17.conv.0.0")  # its channels feed a depthwise conv
    surgery.apply(model, PruningPlan({group.name: [3]}), x, graph=graph)
    s = checkpoint.spec_for(model, name, models.factory_kwargs(name, 10, 3), [3, 32, 32], 10)
    assert "features.17.conv.1.0" in s.widths  # the 1-channel depthwise conv now traces as a group root
    path = checkpoint.save(model, s, tmp_path / "mb.pt")
    assert torch.equal(model(x), compressor.load(path)(x))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_load_under_no_grad_and_inference_mode(tmp_path, mode):
    model, x = pruned("resnet20")
    path = checkpoint.save(model, spec(model, "resnet20"), tmp_path / "m.pt")
    expected = model.eval()(x)
    with mode():
        loaded = compressor.load(path)
        out = loaded(x)
    assert torch.equal(out, expected.detach())
    dense, xc = make("conv4")
    path = checkpoint.save(dense, spec(dense, "conv4"), tmp_path / "c.pt")
    with mode():
        assert compressor.load(path)(xc).shape == (2, 10)


def plain(tmp_path, state, name="w.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_plain_state_dict_loads_for_the_given_model(tmp_path):
    model = models.create("resnet20", 10, 3).eval()
    path = plain(tmp_path, model.state_dict())
    loaded, s = checkpoint.load_for_run(path, "resnet20", 10, 3)
    x = torch.randn(2, 3, 32, 32)
    assert s is None and torch.equal(loaded.eval()(x), model(x))


def test_plain_state_dict_mismatches_are_named(tmp_path):
    state = models.create("resnet20", 10, 3).state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("fc.")}
    with pytest.raises(CheckpointError, match=r"2 missing keys \(fc\.weight, fc\.bias\)"):
        checkpoint.load_for_run(plain(tmp_path, missing), "resnet20", 10, 3)
    extra = {**state, "head.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(head\.weight\)"):
        checkpoint.load_for_run(plain(tmp_path, extra), "resnet20", 10, 3)
    with pytest.raises(CheckpointError, match=r"shape mismatches.*fc\.weight \(10, 64\) vs \(100, 64\)"):
        checkpoint.load_for_run(plain(tmp_path, state), "resnet20", 100, 3)


def test_pickled_whole_model_is_refused(tmp_path):
    path = plain(tmp_path, models.create("conv4", 10, 1))
    with pytest.raises(CheckpointError, match=r"torch\.save\(model\.state_dict\(\), path\)"):
        checkpoint.load_for_run(path, "conv4", 10, 1)


def test_cli_run_from_users_weights(tmp_path, capsys):
    from compressor.cli import main

    fast = ["--dataset", "synthetic", "--epochs", "0", "--finetune-epochs", "0", "--batch-size", "64"]
    good = plain(tmp_path, models.create("conv4", 10, 3).state_dict(), "good.pth")
    args = ["run", "--model", "conv4", "--method", "l1", "--budget-macs", "0.5", *fast]
    assert main([*args, "--checkpoint", str(good), "--out", str(tmp_path / "ok")]) == 0
    assert compressor.load(tmp_path / "ok" / "pruned.pt")(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    bad = plain(tmp_path, models.create("conv4", 10, 1).state_dict(), "bad.pth")  # 1 input plane, run gives 3
    capsys.readouterr()
    assert main([*args, "--checkpoint", str(bad), "--out", str(tmp_path / "bad")]) == 2
    assert "shape mismatches" in capsys.readouterr().err
