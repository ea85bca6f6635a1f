import json

import onnx as onnx_lib
import pytest
import torch
import torch.nn as nn

from compressor import surgery
from compressor.budget import Budget
from compressor.cli import main
from compressor.criteria import PlanRequest, make_plan
from compressor.errors import CompressorError
from compressor.export import aoti, onnx, triton, verify
from compressor.pipeline import RunConfig, run

from .conftest import make


def pruned(name):
    model, x = make(name)
    surgery.apply(model, make_plan("l1", PlanRequest(model, x, Budget("macs", 0.4))), x)
    return model.eval(), x


@pytest.mark.parametrize("prune", [False, True], ids=["dense", "pruned"])
def test_onnx_matches_pytorch_at_any_batch(tmp_path, prune):
    model, _ = pruned("resnet20") if prune else make("resnet20")
    x = torch.randn(5, 3, 32, 32)
    path = onnx.export(model, tmp_path / "m.onnx", x)
    proto = onnx_lib.load(str(path))
    onnx_lib.checker.check_model(proto)
    assert proto.opset_import[0].version >= 17
    runner = onnx.OnnxRuntimeModel(path)
    for batch in (1, 5):
        result = verify(model(x[:batch]), runner(x[:batch]))
        assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("fp16, simplify", [(True, False), (False, True)], ids=["fp16", "simplified"])
def test_onnx_fp16_and_simplified(tmp_path, fp16, simplify):
    model, _ = pruned("resnet20")
    x = torch.randn(32, 3, 32, 32)
    path = onnx.export(model, tmp_path / "m.onnx", x, fp16=fp16, simplify=simplify)
    proto = onnx_lib.load(str(path))
    weights = {t.data_type for t in proto.graph.initializer}
    assert (onnx_lib.TensorProto.FLOAT16 in weights) == fp16
    assert verify(model(x), onnx.OnnxRuntimeModel(path)(x))["top1_agreement"] >= 0.99


@pytest.mark.parametrize("prune", [False, True], ids=["dense", "pruned"])
def test_aoti_package_matches_pytorch(tmp_path, prune):
    model, x = pruned("conv4") if prune else make("conv4")
    path = aoti.export(model, tmp_path / "m.pt2", x, "cpu", max_batch=64)
    runner = aoti.AOTIModel(path)
    for batch in (1, 3):
        xb = torch.randn(batch, 1, 28, 28)
        result = verify(model(xb), runner(xb))
        assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] < 1e-4


def test_disagreement_is_an_error():
    logits = torch.randn(64, 10)
    with pytest.raises(CompressorError, match="disagrees with PyTorch"):
        verify(logits, torch.randn(64, 10))


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("cannot be exported")


def test_failed_export_leaves_no_file(tmp_path):
    with pytest.raises(Exception):
        onnx.export(Broken(), tmp_path / "b.onnx", torch.randn(1, 3, 8, 8))
    with pytest.raises(CompressorError, match="AOTInductor could not compile"):
        aoti.export(Broken(), tmp_path / "b.pt2", torch.randn(2, 3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_low_opset_and_bad_suffix_are_refused(tmp_path):
    model, x = make("conv4")
    with pytest.raises(CompressorError, match="opset"):
        onnx.export(model, tmp_path / "m.onnx", x, opset=13)
    with pytest.raises(CompressorError, match=".pt2"):
        aoti.export(model, tmp_path / "m.so", x)


def pooled(size):
    """A model whose adaptive pool maps an 8x8 map to ``size`` (3x3 does not divide 8: TorchScript refuses it)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(size),
                         nn.Flatten(), nn.Linear(8 * size[0] * size[1], 10)).eval()


def test_non_dividing_adaptive_pool_falls_back_to_the_dynamo_exporter(tmp_path, capfd):
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (pip install onnxscript)")
    model, x = pooled((3, 3)), torch.randn(5, 3, 8, 8)
    path = onnx.export(model, tmp_path / "m.onnx", x)
    assert onnx.exporter_of(path) == "dynamo"
    proto = onnx_lib.load(str(path))
    onnx_lib.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 17
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch axis stays dynamic
    runner = onnx.OnnxRuntimeModel(path)
    for batch in (1, 5):
        result = verify(model(x[:batch]), runner(x[:batch]))
        assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] < 1e-4
    assert "Torch IR graph" not in capfd.readouterr().out  # the TorchScript exporter's failure stays quiet
    # a pool that divides its input keeps the TorchScript exporter
    assert onnx.exporter_of(onnx.export(pooled((4, 4)), tmp_path / "d.onnx", x)) == "torchscript"


def test_non_dividing_adaptive_pool_without_onnxscript_says_what_to_do(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(CompressorError) as info:
        onnx.export(pooled((3, 3)), tmp_path / "m.onnx", torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert "pip install onnxscript" in message and "adaptive pool" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_triton_repository_layout(tmp_path):
    artifact = tmp_path / "a.onnx"
    artifact.write_bytes(b"onnx bytes")
    folder = triton.write_repository(tmp_path / "repo", "vgg-pruned", artifact, "onnx", "input", "logits",
                                     [3, 32, 32], 10, 128)
    assert (folder / "1" / "model.onnx").read_bytes() == b"onnx bytes"
    config = (folder / "config.pbtxt").read_text()
    for line in ('name: "vgg-pruned"', 'platform: "onnxruntime_onnx"', "max_batch_size: 128", 'name: "input"',
                 "dims: [ 3, 32, 32 ]", 'name: "logits"', "dims: [ 10 ]", "dynamic_batching",
                 "preferred_batch_size: [ 8, 32, 128 ]"):
        assert line in config, line
    plan = triton.write_repository(tmp_path / "repo", "e", artifact, "trt", "input", "logits", [3, 32, 32], 10, 8)
    assert (plan / "1" / "model.plan").is_file() and 'platform: "tensorrt_plan"' in (plan / "config.pbtxt").read_text()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "conv4"
    run(RunConfig(model="conv4", dataset="synthetic", epochs=1, finetune_epochs=0, batch_size=64, out=str(out)))
    return out


def test_export_command_writes_verified_artifacts(run_dir, tmp_path, capsys):
    repo = tmp_path / "triton"
    assert main(["export", str(run_dir), "--formats", "onnx", "--triton-repo", str(repo)]) == 0
    results = json.loads((run_dir / "export" / "export.json").read_text())
    assert results["onnx"]["verification"]["top1_agreement"] >= 0.99 and results["verify_images"] == 256
    assert results["onnx"]["exporter"] == "torchscript"  # conv4's global pool divides: no onnxscript needed
    # accuracy of the artifact on the whole test split, beside PyTorch's
    assert results["accuracy"]["images"] == 256 and 0 <= results["accuracy"]["pytorch"] <= 1
    assert results["onnx"]["accuracy"] == pytest.approx(results["accuracy"]["pytorch"], abs=1 / 256)
    assert json.loads((run_dir / "metrics.json").read_text())["export"]["onnx"]["path"] == results["onnx"]["path"]
    assert (repo / "conv4-pruned-onnx" / "1" / "model.onnx").is_file()
    assert "top-1 agreement" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--formats", "onnx,tflite"], "unknown export format"),
    (["--formats", "onnx", "--min-batch", "8", "--opt-batch", "4"], "min batch <= opt batch"),
])
def test_export_bad_inputs(run_dir, capsys, args, words):
    assert main(["export", str(run_dir), *args]) == 2
    assert words in capsys.readouterr().err


def test_export_missing_source(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "no run directory or checkpoint" in capsys.readouterr().err


def test_export_config_takes_keywords_on_top_and_checks_them():
    from compressor.export.config import ExportConfig

    base = ExportConfig(opset=18, max_batch=64)
    merged = ExportConfig.given(base, opt_batch=8)
    assert (merged.opset, merged.max_batch, merged.opt_batch) == (18, 64, 8) and ExportConfig.given(base) is base
    with pytest.raises(CompressorError, match="need 1 <= min batch <= opt batch <= max batch, got 1, 128, 64"):
        ExportConfig.given(base, opt_batch=128)
    with pytest.raises(TypeError, match="opset_version"):
        ExportConfig.given(base, opset_version=18)
    with pytest.raises(CompressorError, match="expected ExportConfig settings, not a dict"):
        ExportConfig.given({"opset": 18})
