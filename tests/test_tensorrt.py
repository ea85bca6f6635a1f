"""TensorRT backend tests.

TensorRT cannot be installed on the machines this project is developed on, so the tests that
build or run engines skip there with the reason; nothing here fakes TensorRT. The precision
plan and the ONNX inspection are plain functions, tested everywhere.
"""
import json
import warnings

import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from compressor.errors import CompressorError
from compressor.export import tensorrt

USABLE, WHY = tensorrt.status()
needs_trt = pytest.mark.skipif(not USABLE, reason=f"TensorRT not usable here: {WHY}")


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10)).eval()


def export_onnx(path, fp16=False):
    """The tiny model as ONNX with a dynamic batch axis; ``fp16`` exports it in half precision (on CUDA)."""
    model, x = tiny_model(), torch.randn(2, 3, 32, 32)
    if fp16:
        model, x = model.half().cuda(), x.half().cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(model, x, str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    return path


def test_status_is_a_reason_not_an_exception():
    ok, why = tensorrt.status()
    assert isinstance(ok, bool) and isinstance(why, str) and why


@pytest.mark.skipif(USABLE, reason="TensorRT is usable here, so it is not missing")
def test_missing_tensorrt_is_one_clear_message(tmp_path):
    with pytest.raises(CompressorError, match="pip install tensorrt") as info:
        tensorrt.require()
    assert "\n" not in str(info.value)
    # build_engine asks for TensorRT before looking at its arguments
    for kwargs in ({}, {"precision": "int4"}):
        with pytest.raises(CompressorError, match="TensorRT engines need TensorRT and a CUDA GPU"):
            tensorrt.build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine", **kwargs)
    with pytest.raises(CompressorError, match="pip install tensorrt"):
        tensorrt.TensorRTModel(tmp_path / "m.engine")
    assert not list(tmp_path.iterdir())


def test_precision_plan_per_tensorrt_version():
    plan = tensorrt.plan_precision
    # TensorRT 10: weak typing with builder flags for plain ONNX, strong typing for Q/DQ ONNX
    assert plan(10, "fp32", False, False) == (False, ())
    assert plan(10, "fp16", False, False) == (False, ("FP16",))
    assert plan(10, "fp16", True, False) == (False, ("FP16",))
    assert plan(10, "int8", False, False) == (False, ("FP16", "INT8"))
    assert plan(10, "int8", False, True) == (True, ())
    # TensorRT 11: strongly typed only, so the ONNX must carry the precision
    assert plan(11, "fp32", False, False) == (True, ())
    assert plan(11, "fp16", True, False) == (True, ())
    assert plan(11, "int8", True, True) == (True, ())
    with pytest.raises(CompressorError, match="fp16 ONNX"):
        plan(11, "fp16", False, False)
    with pytest.raises(CompressorError, match="Q/DQ.*Model Optimizer|Model Optimizer.*Q/DQ"):
        plan(11, "int8", False, False)
    # precisions the ONNX contradicts, and unknown ones
    with pytest.raises(CompressorError, match="use precision int8"):
        plan(10, "fp16", False, True)
    with pytest.raises(CompressorError, match="fp16 weights"):
        plan(10, "fp32", True, False)
    with pytest.raises(CompressorError, match="one of fp32, fp16, int8"):
        plan(10, "int4", False, False)


def test_int8_source_per_tensorrt_version():
    # TensorRT 10: explicit (Q/DQ ONNX) preferred, implicit calibrator still there (deprecated); 11+: Q/DQ only
    assert tensorrt.plan_int8(10, "qdq") == "qdq"
    assert tensorrt.plan_int8(10, "calibrator") == "calibrator"
    assert tensorrt.plan_int8(11, "qdq") == "qdq"
    with pytest.raises(CompressorError, match="removed implicit int8 calibration.*--trt-int8 qdq"):
        tensorrt.plan_int8(11, "calibrator")
    with pytest.raises(CompressorError, match="--trt-int8 must be one of qdq, calibrator"):
        tensorrt.plan_int8(10, "modelopt")
    # a Q/DQ ONNX (onnx-int8) builds strongly typed with no precision flags, so no calibrator is attached
    for major in (10, 11):
        assert tensorrt.plan_precision(major, "int8", False, True) == (True, ())


def test_onnx_types(tmp_path):
    assert tensorrt.onnx_types(export_onnx(tmp_path / "fp32.onnx")) == (False, False)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("zero", TensorProto.INT8, [], [0])
    qdq = helper.make_graph([helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"]),
                             helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"])],
                            "qdq", [x], [y], [scale, zero])
    onnx.save(helper.make_model(qdq, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "qdq.onnx"))
    assert tensorrt.onnx_types(tmp_path / "qdq.onnx") == (False, True)

    h = helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["batch", 4])
    bias = helper.make_tensor("bias", TensorProto.FLOAT16, [4], [0.5] * 4)
    half = helper.make_graph([helper.make_node("Add", ["h", "bias"], ["o"])], "half", [h],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT16, ["batch", 4])], [bias])
    onnx.save(helper.make_model(half, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "half.onnx"))
    assert tensorrt.onnx_types(tmp_path / "half.onnx") == (True, False)

    (tmp_path / "broken.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(CompressorError, match="not a readable ONNX file"):
        tensorrt.onnx_types(tmp_path / "broken.onnx")


@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_pytorch(tmp_path, precision):
    onnx_path = export_onnx(tmp_path / "tiny.onnx", fp16=tensorrt.wants_fp16_onnx(precision))
    engine = tensorrt.build_engine(onnx_path, tmp_path / f"tiny-{precision}.engine", precision=precision,
                                   min_batch=1, opt_batch=16, max_batch=64, workspace_gib=1.0,
                                   timing_cache=tmp_path / "timing.cache", source_sha256="abc")
    assert engine == tmp_path / f"tiny-{precision}.engine" and engine.stat().st_size > 0
    side = json.loads(tensorrt.sidecar_path(engine).read_text())
    assert side["precision"] == precision and side["workspace_gib"] == 1.0
    assert (side["min_batch"], side["opt_batch"], side["max_batch"]) == (1, 16, 64)
    assert side["inputs"][0]["name"] == "input" and side["inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert side["outputs"][0]["name"] == "logits" and side["outputs"][0]["shape"] == [-1, 10]
    assert side["inputs"][0]["dtype"] in ("float32", "float16")
    assert side["tensorrt"] == WHY and side["gpu"] and side["source_sha256"] == "abc" and side["onnx"] == "tiny.onnx"
    assert (tmp_path / "timing.cache").stat().st_size > 0

    model = tensorrt.TensorRTModel(engine)
    assert (model.input_name, model.output_name) == ("input", "logits")
    assert model.batch_range == (1, 64)
    torch.manual_seed(1)
    x = torch.randn(64, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected = tiny_model().cuda()(x)
    got = model(x)
    assert got.shape == (64, 10) and got.dtype == torch.float32 and got.device.type == "cuda"
    if precision == "fp32":
        assert (got - expected).abs().max().item() < 1e-3
    else:
        assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.99
    small = model(x[:3])  # another batch size in the profile: the shape follows the input
    assert small.shape == (3, 10)
    if precision == "fp32":
        assert (small - expected[:3]).abs().max().item() < 1e-3
    with pytest.raises(CompressorError, match="outside the engine's profile"):
        model(torch.randn(65, 3, 32, 32, device="cuda"))


@needs_trt
def test_int8_engine_writes_and_reuses_a_calibration_cache(tmp_path):
    if tensorrt.major_version(tensorrt.require()) >= 11:
        pytest.skip("TensorRT 11+ has no implicit int8 calibration; int8 needs a Q/DQ ONNX")
    onnx_path = export_onnx(tmp_path / "tiny.onnx")
    torch.manual_seed(2)
    batches = [torch.randn(16, 3, 32, 32) for _ in range(4)] + [torch.randn(5, 3, 32, 32)]  # short last batch
    cache = tmp_path / "tiny.calib"
    engine = tensorrt.build_engine(onnx_path, tmp_path / "tiny-int8.engine", precision="int8", opt_batch=16,
                                   max_batch=64, calibration_batches=iter(batches), calibration_cache=cache)
    assert engine.is_file() and cache.stat().st_size > 0
    assert json.loads(tensorrt.sidecar_path(engine).read_text())["calibration_batches"] == 4
    # with the cache, no images are needed
    again = tensorrt.build_engine(onnx_path, tmp_path / "again-int8.engine", precision="int8", opt_batch=16,
                                  max_batch=64, calibration_cache=cache)
    x = torch.randn(8, 3, 32, 32, device="cuda")
    assert tensorrt.TensorRTModel(again)(x).shape == (8, 10)
    with pytest.raises(CompressorError, match="calibration batches"):
        tensorrt.build_engine(onnx_path, tmp_path / "none.engine", precision="int8", calibration_batches=[])


@needs_trt
def test_int8_engine_from_qdq_onnx_is_explicitly_quantized(tmp_path):
    from compressor.export import quantize

    onnx_path = export_onnx(tmp_path / "tiny.onnx")
    torch.manual_seed(3)
    images = torch.randn(64, 3, 32, 32)
    qdq = quantize.quantize(onnx_path, tmp_path / "tiny-int8.onnx", images, tensorrt=True)
    assert tensorrt.onnx_types(qdq) == (False, True)
    engine = tensorrt.build_engine(qdq, tmp_path / "tiny-int8.engine", precision="int8", opt_batch=16,
                                   max_batch=64, calibration_cache=tmp_path / "unused.calib")
    side = json.loads(tensorrt.sidecar_path(engine).read_text())
    assert side["strongly_typed"] and side["calibration_batches"] is None
    assert side["quantization"] == "explicit (Q/DQ in the ONNX)" and side["onnx"] == "tiny-int8.onnx"
    assert not (tmp_path / "unused.calib").exists()  # no calibrator ran
    x = torch.randn(32, 3, 32, 32, device="cuda")
    with torch.no_grad():
        expected = tiny_model().cuda()(x)
    got = tensorrt.TensorRTModel(engine)(x)
    assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.9


@needs_trt
def test_bad_inputs_are_one_clear_error_and_leave_no_engine(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(CompressorError):
        tensorrt.build_engine(broken, tmp_path / "b.engine")
    with pytest.raises(CompressorError, match="one of fp32, fp16, int8"):
        tensorrt.build_engine(export_onnx(tmp_path / "tiny.onnx"), tmp_path / "b.engine", precision="int4")
    with pytest.raises(CompressorError, match="min batch <= opt batch"):
        tensorrt.build_engine(tmp_path / "tiny.onnx", tmp_path / "b.engine", min_batch=8, opt_batch=4)
    assert not (tmp_path / "b.engine").exists() and not tensorrt.sidecar_path(tmp_path / "b.engine").exists()
    with pytest.raises(CompressorError, match="no TensorRT engine"):
        tensorrt.TensorRTModel(tmp_path / "b.engine")
