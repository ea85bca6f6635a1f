"""compressor.runtime.load: one callable for every artifact, checked against PyTorch on the same batch."""
import json

import onnx as onnx_lib
import pytest
import torch

from compressor import checkpoint, models, runtime, surgery
from compressor.budget import Budget
from compressor.criteria import PlanRequest, make_plan
from compressor.errors import CompressorError
from compressor.export import INT8_MAX_RELATIVE_DIFF, aoti, onnx, tensorrt

SHAPE = [1, 12, 12]
CLASSES = ["zero", "one", "two"]
NORM = {"mean": [0.4], "std": [0.25]}
MAX_BATCH = 8


def tiny_model():
    """A Conv-4 pruned to 60% of its MACs, with a checkpoint spec that records a normalisation."""
    torch.manual_seed(0)
    model = models.create("conv4", len(CLASSES), SHAPE[0]).eval()
    x = torch.randn(2, *SHAPE)
    surgery.apply(model, make_plan("l1", PlanRequest(model, x, Budget("macs", 0.6))), x)
    for m in model.modules():  # non-trivial BN statistics, so normalisation mistakes show in the logits
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    spec = checkpoint.spec_for(model.eval(), "conv4", models.factory_kwargs("conv4", len(CLASSES), SHAPE[0]), SHAPE,
                               len(CLASSES), normalization=NORM, dataset="synthetic", classes=CLASSES)
    return model.eval(), spec


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    model, spec = tiny_model()
    ckpt = checkpoint.save(model, spec, folder / "pruned.pt")
    path = onnx.export(model, folder / "m.onnx", torch.randn(2, *SHAPE))
    runtime.write_metadata(path, spec, MAX_BATCH)
    return {"model": model, "spec": spec, "folder": folder, "checkpoint": ckpt, "onnx": path}


@pytest.fixture(scope="module")
def aoti_package(made):
    path = aoti.export(made["model"], made["folder"] / "m-cpu.pt2", torch.randn(2, *SHAPE), "cpu",
                       max_batch=MAX_BATCH, spec=made["spec"])
    return path


def pixels(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g)


def reference(model, images_uint8):
    x = (images_uint8.float() / 255 - NORM["mean"][0]) / NORM["std"][0]
    with torch.no_grad():
        return model(x), x


def check_kind(rt, model, kind):
    assert rt.kind == kind and rt.max_batch == MAX_BATCH
    assert rt.spec.input_shape == SHAPE and rt.spec.classes == CLASSES and rt.class_names == CLASSES
    assert rt.spec.normalization == NORM and rt.input_shape == tuple(SHAPE) and rt.num_classes == 3
    images = pixels(5)
    expected, normalised = reference(model, images)
    for got in (rt(images, raw=True), rt(images.numpy(), raw=True), rt(images.float() / 255, raw=True),
                rt(normalised), rt(normalised.numpy())):
        assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (5, 3)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for n in (1, MAX_BATCH):  # any batch up to the maximum
        torch.testing.assert_close(rt(pixels(n, 1), raw=True), reference(model, pixels(n, 1))[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(CompressorError, match=f"batch of {MAX_BATCH + 1} images is over .* maximum of {MAX_BATCH}"):
        rt(pixels(MAX_BATCH + 1), raw=True)
    with pytest.raises(CompressorError, match=r"wrong input shape: expected \(N, 1, 12, 12\), got \(2, 1, 12, 13\)"):
        rt(torch.zeros(2, 1, 12, 13))
    with pytest.raises(CompressorError, match=r"wrong input shape: expected \(N, 1, 12, 12\), got \(2, 3, 12, 12\)"):
        rt(torch.zeros(2, 3, 12, 12, dtype=torch.uint8), raw=True)
    with pytest.raises(CompressorError, match="add a batch axis"):
        rt(torch.zeros(*SHAPE))
    with pytest.raises(CompressorError, match="raw=True"):
        rt(images)  # uint8 pixels without raw
    with pytest.raises(CompressorError, match=r"raw float images must be in \[0, 1\]"):
        rt(images.float(), raw=True)  # pixels in [0, 255] as floats
    with pytest.raises(CompressorError, match="uint8 .* or float"):
        rt(images.long(), raw=True)
    with pytest.raises(CompressorError, match="torch tensor or a numpy array"):
        rt(images.tolist())
    with pytest.raises(CompressorError, match="empty batch"):
        rt(torch.zeros(0, *SHAPE))


def test_checkpoint(made):
    check_kind(runtime.load(made["checkpoint"], max_batch=MAX_BATCH), made["model"], "checkpoint")
    assert runtime.load(made["checkpoint"]).max_batch == runtime.DEFAULT_MAX_BATCH


def test_onnx_fp32(made):
    rt = runtime.load(made["onnx"])
    check_kind(rt, made["model"], "onnx")
    assert rt.describe()["max_batch"] == MAX_BATCH and rt.describe()["classes"] == CLASSES
    assert runtime.load(made["onnx"], max_batch=2).max_batch == 2
    with pytest.raises(CompressorError, match="over what m.onnx was built for"):
        runtime.load(made["onnx"], max_batch=MAX_BATCH + 1)


@pytest.mark.slow  # AOTInductor compiles C++ for the CPU: about 20-30 s on 2 cores
def test_aoti_cpu_package(made, aoti_package):
    side = json.loads(aoti.sidecar_path(aoti_package).read_text())
    assert side["spec"]["classes"] == CLASSES and side["max_batch"] == MAX_BATCH and side["device"] == "cpu"
    inside = aoti.package_metadata(aoti_package)  # also recorded inside the package itself
    assert inside["AOTI_DEVICE_KEY"] == "cpu" and inside["input_shape"] == SHAPE and inside["spec"] == side["spec"]
    check_kind(runtime.load(aoti_package), made["model"], "aoti")
    aoti.sidecar_path(aoti_package).rename(aoti_package.with_suffix(".moved"))
    try:  # without its sidecar the package still knows its shape and spec
        check_kind(runtime.load(aoti_package), made["model"], "aoti")
    finally:
        aoti_package.with_suffix(".moved").rename(aoti.sidecar_path(aoti_package))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_aoti_wrong_device(aoti_package):
    with pytest.raises(CompressorError, match="sees no CUDA GPU"):
        runtime.load(aoti_package, device="cuda")


@pytest.mark.slow
def test_wrong_device_for_a_cpu_package(made, aoti_package, tmp_path):
    side = json.loads(aoti.sidecar_path(aoti_package).read_text())
    fake = tmp_path / "gpu.pt2"  # the same package, its sidecar saying CUDA: refused before any load
    fake.write_bytes(aoti_package.read_bytes())
    aoti.sidecar_path(fake).write_text(json.dumps({**side, "device": "cuda"}))
    with pytest.raises(CompressorError, match="compiled for cuda, so it runs only there: load it with device='cuda'"):
        runtime.load(fake, device="cpu")


@pytest.mark.parametrize("kind", ["checkpoint", "onnx", pytest.param("aoti", marks=pytest.mark.slow)])
def test_loading_under_inference_mode(made, kind, request):
    path = request.getfixturevalue("aoti_package") if kind == "aoti" else made[kind]
    images = pixels(3)
    expected, _ = reference(made["model"], images)
    with torch.inference_mode():
        rt = runtime.load(path)
        torch.testing.assert_close(rt(images, raw=True), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rt(images, raw=True), expected, atol=1e-4, rtol=1e-4)  # and outside it


def test_metadata_survives_fp16_and_simplify(made, tmp_path):
    meta = {onnx.SPEC_KEY: json.dumps(runtime.spec_to_dict(made["spec"])), onnx.MAX_BATCH_KEY: "4"}
    path = onnx.export(made["model"], tmp_path / "h.onnx", torch.randn(2, *SHAPE), fp16=True, simplify=True,
                       metadata=meta)
    props = onnx.read_metadata(path)
    assert props[onnx.SPEC_KEY] == meta[onnx.SPEC_KEY] and props[onnx.EXPORTER_KEY] in ("torchscript", "dynamo")
    rt = runtime.load(path)
    assert rt.max_batch == 4 and rt.spec == made["spec"]
    images = pixels(4)
    expected, _ = reference(made["model"], images)
    assert (rt(images, raw=True).argmax(1) == expected.argmax(1)).float().mean() >= 0.75
    torch.testing.assert_close(rt(images, raw=True), expected, atol=5e-2, rtol=5e-2)


def test_int8_qdq_onnx_loads(made, tmp_path):
    pytest.importorskip("onnxruntime.quantization")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    images = pixels(MAX_BATCH, 3)
    _, normalised = reference(made["model"], images)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{onnx.INPUT: normalised[i:i + 4].numpy()} for i in range(0, MAX_BATCH, 4)])

        def get_next(self):
            return next(self.batches, None)

    path = tmp_path / "q.onnx"
    quantize_static(str(made["onnx"]), str(path), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    proto = onnx_lib.load(str(path))
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    if onnx.SPEC_KEY not in onnx.read_metadata(path):  # the int8 exporter copies metadata_props; do it here
        runtime.write_metadata(path, made["spec"], MAX_BATCH)
    rt = runtime.load(path)
    assert rt.kind == "onnx" and rt.spec == made["spec"]
    expected, _ = reference(made["model"], images)
    got = rt(images, raw=True)
    assert got.shape == expected.shape and (got - expected).abs().max() < 0.5


def test_foreign_onnx_loads_but_refuses_raw(made, tmp_path):
    proto = onnx_lib.load(str(made["onnx"]))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx_lib.save(proto, str(foreign))
    rt = runtime.load(foreign)
    assert rt.spec is None and rt.input_shape == tuple(SHAPE) and rt.num_classes == 3
    assert rt.max_batch == runtime.DEFAULT_MAX_BATCH and rt.describe()["has_spec"] is False
    expected, normalised = reference(made["model"], pixels(2))
    torch.testing.assert_close(rt(normalised), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(CompressorError, match="records no model spec, so its normalisation is unknown"):
        rt(pixels(2), raw=True)
    with pytest.raises(CompressorError, match="wrong input shape"):
        rt(torch.zeros(1, 1, 10, 10))


def test_load_errors(made, tmp_path):
    with pytest.raises(CompressorError, match="no onnx artifact at"):
        runtime.load(tmp_path / "missing.onnx")
    with pytest.raises(CompressorError, match="no checkpoint artifact at"):
        runtime.load(tmp_path / "missing.pt")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(CompressorError, match=r"unknown artifact type '.bin'"):
        runtime.load(tmp_path / "model.bin")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(CompressorError, match="not a readable ONNX file"):
        runtime.load(tmp_path / "junk.onnx")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(CompressorError, match="not an AOTInductor package"):
        runtime.load(tmp_path / "junk.pt2")
    with pytest.raises(CompressorError, match="device must be 'cpu' or 'cuda'"):
        runtime.load(made["onnx"], device="mps")
    with pytest.raises(CompressorError, match="max_batch must be a positive integer"):
        runtime.load(made["onnx"], max_batch=0)


def test_engine_needs_cuda(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0")  # refused before TensorRT is touched: no engine is needed for this
    with pytest.raises(CompressorError, match="TensorRT engine, which runs only on a CUDA GPU: load it with "
                                              "device='cuda'"):
        runtime.load(engine, device="cpu")


def test_write_metadata_merges_into_a_tensorrt_sidecar(made, tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0")
    tensorrt.sidecar_path(engine).write_text(json.dumps({"precision": "fp16", "max_batch": 32}))
    runtime.write_metadata(engine, made["spec"], max_batch=MAX_BATCH)
    side = json.loads(tensorrt.sidecar_path(engine).read_text())
    assert side["precision"] == "fp16" and side["max_batch"] == 32  # the profile's own limit is kept
    assert runtime.spec_from_dict(side["spec"], "x") == made["spec"]


@pytest.mark.skipif(not tensorrt.status()[0], reason=f"TensorRT engines need TensorRT and CUDA: {tensorrt.status()[1]}")
def test_tensorrt_engine(made, tmp_path):
    engine = tensorrt.build_engine(made["onnx"], tmp_path / "m.engine", precision="fp32", min_batch=1, opt_batch=4,
                                   max_batch=MAX_BATCH, workspace_gib=1.0)
    runtime.write_metadata(engine, made["spec"], MAX_BATCH)
    rt = runtime.load(engine, device="cuda")
    assert rt.kind == "tensorrt" and rt.max_batch == MAX_BATCH and rt.spec == made["spec"]
    images = pixels(5)
    expected, normalised = reference(made["model"], images)
    torch.testing.assert_close(rt(images, raw=True).cpu(), expected, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(rt(normalised.cuda()).cpu(), expected, atol=1e-3, rtol=1e-3)
    with pytest.raises(CompressorError, match="over .* maximum"):
        rt(pixels(MAX_BATCH + 1), raw=True)
    with pytest.raises(CompressorError, match="runs only on a CUDA GPU"):
        runtime.load(engine, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_artifacts(made, tmp_path):
    images = pixels(5)
    expected, _ = reference(made["model"], images)
    rt = runtime.load(made["checkpoint"], device="cuda")
    torch.testing.assert_close(rt(images, raw=True).cpu(), expected, atol=1e-3, rtol=1e-3)
    package = aoti.export(made["model"], tmp_path / "m-cuda.pt2", torch.randn(2, *SHAPE), "cuda",
                          max_batch=MAX_BATCH, spec=made["spec"])
    rt = runtime.load(package, device="cuda")
    assert rt.device.type == "cuda"
    torch.testing.assert_close(rt(images, raw=True).cpu(), expected, atol=1e-3, rtol=1e-3)
    with pytest.raises(CompressorError, match="compiled for cuda"):
        runtime.load(package, device="cpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        rt = runtime.load(made["onnx"], device="cuda")
        torch.testing.assert_close(rt(images, raw=True).cpu(), expected, atol=1e-3, rtol=1e-3)
    else:
        with pytest.raises(CompressorError, match="onnxruntime-gpu"):
            runtime.load(made["onnx"], device="cuda")


def test_compress_export_records_the_spec(tmp_path):
    """`compress export` stamps every artifact, so the runtime loads it with the checkpoint's spec."""
    from compressor import data as datasets
    from compressor.export.run import export

    data = datasets.load("synthetic", None, val_fraction=0.0)
    torch.manual_seed(0)
    model = models.create("conv4", len(data.classes), 3).eval()
    spec = checkpoint.spec_for(model, "conv4", models.factory_kwargs("conv4", len(data.classes), 3), [3, 32, 32],
                               len(data.classes), normalization=data.normalization, dataset="synthetic",
                               classes=data.classes)
    ckpt = checkpoint.save(model, spec, tmp_path / "pruned.pt")
    from compressor.export import FORMATS

    formats = "onnx,onnx-int8" if "onnx-int8" in FORMATS else "onnx"
    extra = {"calibration_images": 32} if "onnx-int8" in FORMATS else {}
    results = export(ckpt, formats, out=tmp_path / "export", opt_batch=8, max_batch=16, verify_batch=16,
                     **extra)  # verification at its real thresholds (99%, int8 95% and 15% of the logits)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    x = (images.float() / 255 - torch.tensor(spec.normalization["mean"]).view(1, -1, 1, 1)) / torch.tensor(
        spec.normalization["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = model(x)
    rt = runtime.load(results["onnx"]["path"])
    assert rt.spec == spec and rt.max_batch == 16 and rt.kind == "onnx"
    torch.testing.assert_close(rt(images, raw=True), expected, atol=1e-4, rtol=1e-4)
    if "onnx-int8" in results:  # the int8 file keeps the fp32 file's metadata
        rt = runtime.load(results["onnx-int8"]["path"])
        assert rt.spec == spec and rt.max_batch == 16 and rt.self_test["top1_agreement"] == 1.0
        got = rt(images, raw=True)
        assert got.shape == expected.shape
        assert float((got - expected).abs().max() / expected.abs().max()) <= INT8_MAX_RELATIVE_DIFF
