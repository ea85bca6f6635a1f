"""int8 ONNX (ONNX Runtime static quantization, QDQ) and the accuracy that ``compress export`` records.

A small CNN is trained for a few seconds on compressor's ``synthetic`` data set (learnable
class patterns), exported to fp32 ONNX and quantized. Stated tolerance: on this data set's
256 test images, int8 top-1 accuracy stays within 2 points of the fp32 ONNX's.
"""
import json

import numpy as np
import onnx as onnx_lib
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from compressor import data as datasets
from compressor.cli import main
from compressor.data import DeviceBatches
from compressor.errors import CompressorError
from compressor.export import onnx, parse_formats, quantize
from compressor.export.config import ExportConfig
from compressor.export.run import split_accuracy
from compressor.pipeline import RunConfig, run

INT8_TOLERANCE_POINTS = 2.0  # int8 vs fp32 top-1 accuracy on the synthetic test split


@pytest.fixture(scope="module")
def synthetic():
    return datasets.load("synthetic", val_fraction=0.0)


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    """(model, fp32 ONNX path, calibration images): a small CNN trained to high accuracy in seconds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(4):
        for x, y in DeviceBatches(synthetic, "train", 64, "cpu", train=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    folder = tmp_path_factory.mktemp("int8")
    x, _ = next(iter(DeviceBatches(synthetic, "test", 8, "cpu")))
    path = onnx.export(model, folder / "fp32.onnx", x)
    return model, path, quantize.calibration_images(synthetic, 256)


def accuracy_of(path, data):
    return split_accuracy(onnx.OnnxRuntimeModel(path), data)


def test_int8_keeps_accuracy_within_tolerance(trained, synthetic, tmp_path):
    model, fp32, images = trained
    fp32_accuracy = accuracy_of(fp32, synthetic)
    assert fp32_accuracy >= 0.9, "the tiny model did not learn the synthetic patterns"
    int8 = quantize.quantize(fp32, tmp_path / "int8.onnx", images)
    int8_accuracy = accuracy_of(int8, synthetic)
    assert 100 * (fp32_accuracy - int8_accuracy) <= INT8_TOLERANCE_POINTS, (fp32_accuracy, int8_accuracy)
    assert abs(split_accuracy(model, synthetic) - fp32_accuracy) < 1e-9


@pytest.mark.parametrize("scheme, dtype, zero", [("s8s8", np.int8, 0), ("u8u8", np.uint8, 128)])
def test_qdq_nodes_and_per_channel_conv_weights(trained, tmp_path, scheme, dtype, zero):
    _, fp32, images = trained
    proto = onnx_lib.load(str(quantize.quantize(fp32, tmp_path / "int8.onnx", images, scheme=scheme)))
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    init = {t.name: t for t in proto.graph.initializer}
    producer = {out: n for n in proto.graph.node for out in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2
    for conv in convs:
        dq = producer[conv.input[1]]  # the weight arrives dequantized from int8, one scale per output channel
        assert dq.op_type == "DequantizeLinear"
        weight = numpy_helper.to_array(init[dq.input[0]])
        scale = numpy_helper.to_array(init[dq.input[1]])
        assert weight.dtype == dtype and scale.shape == (weight.shape[0],)
        assert all(a.i == 0 for a in dq.attribute if a.name == "axis")
        if len(dq.input) > 2:  # symmetric: the zero point is the type's middle
            assert np.all(numpy_helper.to_array(init[dq.input[2]]).astype(int) == zero)
    summary = quantize.describe(tmp_path / "int8.onnx")
    assert summary["quantize_linear"] > 0 and len(summary["per_channel_weights"]) >= 2
    assert "per-channel" in summary["setting"] and "minmax" in summary["setting"] and "256 images" in summary["setting"]
    assert f"scheme {scheme}" in summary["setting"]


def test_metadata_is_copied(trained, tmp_path):
    _, fp32, images = trained
    proto = onnx_lib.load(str(fp32))
    onnx_lib.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                            "compressor.spec": '{"model": "tiny"}'})
    onnx_lib.save(proto, str(tmp_path / "with-spec.onnx"))
    int8 = onnx_lib.load(str(quantize.quantize(tmp_path / "with-spec.onnx", tmp_path / "int8.onnx", images)))
    props = {p.key: p.value for p in int8.metadata_props}
    assert props["compressor.spec"] == '{"model": "tiny"}'
    assert props[onnx.EXPORTER_KEY] == "torchscript" and quantize.QUANTIZATION_KEY in props


def activation_scales(path):
    """Scales of the activation QuantizeLinear nodes, in graph order."""
    proto = onnx_lib.load(str(path))
    init = {t.name: t for t in proto.graph.initializer}
    return [float(numpy_helper.to_array(init[n.input[1]])) for n in proto.graph.node if n.op_type == "QuantizeLinear"]


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_method_is_used(trained, synthetic, tmp_path, method):
    _, fp32, images = trained
    minmax = quantize.quantize(fp32, tmp_path / "minmax.onnx", images[:64], "minmax")
    other = quantize.quantize(fp32, tmp_path / f"{method}.onnx", images[:64], method, histogram_bins=512)
    assert f"{method} (" in quantize.describe(other)["setting"] and "512 bins" in quantize.describe(other)["setting"]
    assert activation_scales(other) != activation_scales(minmax)  # another method, other ranges
    assert 100 * (accuracy_of(fp32, synthetic) - accuracy_of(other, synthetic)) <= INT8_TOLERANCE_POINTS


def test_symmetric_activations_for_tensorrt(trained, tmp_path):
    _, fp32, images = trained
    proto = onnx_lib.load(str(quantize.quantize(fp32, tmp_path / "sym.onnx", images[:64], tensorrt=True)))
    init = {t.name: t for t in proto.graph.initializer}
    zero_points = [numpy_helper.to_array(init[n.input[2]]) for n in proto.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # TensorRT: zero points 0
    assert "float biases" in quantize.describe(tmp_path / "sym.onnx")["setting"]


def test_calibration_images_are_seeded_and_normalised_like_the_model_inputs(synthetic):
    a, b = quantize.calibration_images(synthetic, 100), quantize.calibration_images(synthetic, 100)
    assert a.shape == (100, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, quantize.calibration_images(synthetic, 100, seed=1))
    everything = quantize.calibration_images(synthetic, 10**6)  # more than there are: all of them, in order
    assert len(everything) == len(synthetic.train_y)
    reference = torch.cat([x for x, _ in DeviceBatches(synthetic, "train", 512, "cpu")])
    assert torch.allclose(everything, reference, atol=1e-6)


def test_bad_options_are_refused(trained, tmp_path, capsys):
    _, fp32, images = trained
    with pytest.raises(CompressorError, match="--calibration-images must be at least 1, got 0"):
        ExportConfig(calibration_images=0, calibration_method="minmax")
    with pytest.raises(CompressorError, match="--calibration-method must be one of minmax, entropy, percentile"):
        ExportConfig(calibration_images=512, calibration_method="kl")
    with pytest.raises(CompressorError, match="--calibration-method"):
        quantize.quantize(fp32, tmp_path / "x.onnx", images, "kl")
    with pytest.raises(CompressorError, match="--calibration-images"):
        ExportConfig(calibration_images=-3)
    with pytest.raises(CompressorError, match="--trt-int8"):
        ExportConfig(trt_int8="implicit")
    with pytest.raises(CompressorError, match="int8_min_agreement"):
        ExportConfig(int8_min_agreement=1.5)
    with pytest.raises(CompressorError, match="already quantized"):
        quantize.quantize(quantize.quantize(fp32, tmp_path / "q.onnx", images[:32]), tmp_path / "qq.onnx", images)
    assert parse_formats("onnx,onnx-int8") == ["onnx", "onnx-int8"]
    for args, words in ((["--calibration-images", "0"], "must be at least 1, got 0"),
                        (["--calibration-images", "many"], "must be a whole number"),
                        (["--calibration-method", "kl"], "invalid choice: 'kl'")):
        with pytest.raises(SystemExit) as info:
            main(["export", str(tmp_path), "--formats", "onnx-int8", *args])
        assert info.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "qq.onnx").exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "conv4"
    run(RunConfig(model="conv4", dataset="synthetic", epochs=1, finetune_epochs=0, batch_size=64, out=str(out)))
    return out


def test_export_records_int8_and_accuracy_of_every_artifact(run_dir, capsys):
    assert main(["export", str(run_dir), "--formats", "onnx,onnx-int8", "--calibration-images", "128",
                 "--calibration-method", "percentile"]) == 0
    results = json.loads((run_dir / "export" / "export.json").read_text())
    assert results["accuracy"]["split"] == "test" and results["accuracy"]["images"] == 256
    pytorch = results["accuracy"]["pytorch"]
    assert abs(results["onnx"]["accuracy"] - pytorch) < 1e-9 and results["onnx"]["min_agreement"] == 0.99
    int8 = results["onnx-int8"]
    assert int8["min_agreement"] == 0.95 and int8["verification"]["top1_agreement"] >= 0.95
    assert int8["calibration"] == {"method": "percentile", "images": 128, "split": "train", "seed": 0}
    assert int8["format"] == "QDQ" and int8["per_channel_weights"] > 0 and int8["activations"] == "int8, asymmetric"
    assert 0 <= int8["accuracy"] <= 1
    assert int8["accuracy_drop_points"] == pytest.approx(100 * (pytorch - int8["accuracy"]), abs=1e-3)
    assert json.loads((run_dir / "metrics.json").read_text())["export"]["onnx-int8"]["accuracy"] == int8["accuracy"]
    fp32_props = {p.key: p.value for p in onnx_lib.load(results["onnx"]["path"]).metadata_props}
    int8_props = {p.key: p.value for p in onnx_lib.load(int8["path"]).metadata_props}
    own = "compressor.self_test"  # each artifact's own answers (compressor.selftest), not copied
    assert json.loads(fp32_props.pop(own))["kind"] == "onnx" and json.loads(int8_props.pop(own))["kind"] == "onnx-int8"
    assert fp32_props.items() <= int8_props.items()  # the spec the runtime loader reads comes along
    assert "test accuracy" in capsys.readouterr().out

    assert main(["export", str(run_dir), "--formats", "onnx", "--no-accuracy", "--out", str(run_dir / "fast")]) == 0
    fast = json.loads((run_dir / "fast" / "export.json").read_text())
    assert "accuracy" not in fast and "accuracy" not in fast["onnx"] and fast["onnx"]["verification"]


def test_int8_onnx_refuses_an_fp16_onnx(run_dir, capsys):
    assert main(["export", str(run_dir), "--formats", "onnx-int8", "--onnx-fp16", "--out", str(run_dir / "x")]) == 2
    assert "drop --onnx-fp16" in capsys.readouterr().err and not (run_dir / "x").exists()
