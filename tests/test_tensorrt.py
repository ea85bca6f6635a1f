"""TensorRT tests. TensorRT cannot be installed on the machines this project is built on,
so everything that needs it skips there with the reason; nothing here fakes TensorRT."""
import json

import pytest
import torch
import torch.nn as nn

from compressor.cli import main
from compressor.errors import CompressorError
from compressor.export import tensorrt

USABLE, WHY = tensorrt.status()
needs_trt = pytest.mark.skipif(not USABLE, reason=f"TensorRT not usable here: {WHY}")


@pytest.mark.skipif(USABLE, reason="TensorRT is usable here, so it is not missing")
def test_missing_tensorrt_is_one_clear_message(tmp_path, capsys):
    with pytest.raises(CompressorError, match="pip install tensorrt"):
        tensorrt.require()
    with pytest.raises(CompressorError, match="TensorRT engines need TensorRT and a CUDA GPU"):
        tensorrt.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
    with pytest.raises(CompressorError, match="pip install tensorrt"):
        tensorrt.TensorRTModel(tmp_path / "m.engine")
    # the CLI stops at once, before any data is read or any epoch is spent
    assert main(["run", "--dataset", "synthetic", "--export", "onnx,trt", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "pip install tensorrt" in err and "Traceback" not in err and not (tmp_path / "r").exists()


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10)).eval()


@pytest.fixture
def onnx_file(tmp_path):
    from compressor.export import onnx

    return onnx.export(tiny_model(), tmp_path / "tiny.onnx", torch.randn(2, 3, 32, 32))


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_pytorch(tmp_path, onnx_file, precision):
    if tensorrt.wants_fp16_onnx(precision):
        from compressor.export import onnx

        onnx_file = onnx.export(tiny_model(), tmp_path / "tiny16.onnx", torch.randn(2, 3, 32, 32), fp16=True)
    engine = tensorrt.build_engine(onnx_file, tmp_path / f"tiny-{precision}.engine", precision=precision,
                                   min_batch=1, opt_batch=16, max_batch=64, workspace_gib=1.0,
                                   timing_cache=tmp_path / "timing.cache", source_sha256="abc")
    side = json.loads(tensorrt.sidecar_path(engine).read_text())
    assert side["precision"] == precision and side["batch"] == {"min": 1, "opt": 16, "max": 64}
    assert side["inputs"][0]["name"] == "input" and side["inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert side["tensorrt"] and side["gpu"] and side["source_sha256"] == "abc"
    assert (tmp_path / "timing.cache").stat().st_size > 0
    model = tensorrt.TensorRTModel(engine)
    x = torch.randn(64, 3, 32, 32, device="cuda")
    expected = tiny_model().cuda()(x)
    got = model(x)
    if precision == "fp32":
        assert (got - expected).abs().max().item() < 1e-3
    else:
        assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.99
    with pytest.raises(CompressorError, match="outside the engine's profile"):
        model(torch.randn(65, 3, 32, 32, device="cuda"))


@needs_trt
def test_int8_engine_writes_a_calibration_cache(tmp_path, onnx_file):
    if not tensorrt._uses_precision_flags(tensorrt.require()):
        pytest.skip("TensorRT 11+ has no implicit int8 calibration; int8 needs a Q/DQ ONNX")
    batches = [torch.randn(16, 3, 32, 32) for _ in range(4)]
    engine = tensorrt.build_engine(onnx_file, tmp_path / "tiny-int8.engine", precision="int8", opt_batch=16,
                                   max_batch=64, calibration_batches=batches, calibration_cache=tmp_path / "c.cache")
    assert engine.is_file() and (tmp_path / "c.cache").stat().st_size > 0


@needs_trt
def test_failed_build_leaves_no_engine(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(Exception):
        tensorrt.build_engine(broken, tmp_path / "b.engine")
    assert not (tmp_path / "b.engine").exists()
