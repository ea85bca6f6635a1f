"""Static int8 quantization of an exported ONNX file with ONNX Runtime: the ``onnx-int8`` format.

The fp32 ONNX is preprocessed as ONNX Runtime recommends (``quant_pre_process``: symbolic
shape inference and graph optimisation), then quantized by ``quantize_static`` into QDQ
format (QuantizeLinear/DequantizeLinear pairs around the quantized operators), with int8
weights quantized per output channel and int8 activations whose ranges come from a stated
number of training images (drawn with a fixed seed, normalised with the checkpoint's own
mean and std). The calibration method is a choice: ``minmax``, ``entropy`` or ``percentile``.

``minmax`` is ``quantize_static``'s own calibration. For ``entropy`` and ``percentile`` the
ranges are computed first with ONNX Runtime's ``create_calibrator`` at a stated histogram
resolution (:data:`HISTOGRAM_BINS`; ``quantize_static`` alone uses 128 bins for entropy,
and with 128 quantized bins that leaves one candidate threshold, the full range, so its
"entropy" would be min-max), and handed to ``quantize_static`` as per-tensor ``rmin``/``rmax``
overrides (``TensorQuantOverrides``, documented in its ``extra_options``).

Which 8-bit types (:data:`SCHEMES`): ONNX Runtime's x86 kernels multiply uint8 activations by
int8 weights with ``vpmaddubsw``, whose 16-bit pair sums (up to 2 x 255 x 127) saturate on CPUs
without VNNI; a file checked on a VNNI machine can then answer wrongly on an AVX2 server (ONNX
Runtime's quantization docs describe this). ``s8s8-reduced`` (the default) keeps int8 but
quantizes weights to 7 bits (``reduce_range``): 2 x 255 x 64 fits in 16 bits, so no CPU
saturates, at int8's speed. ``u8u8`` (uint8 both) takes kernels without that saturation too, but
ran slower than fp32 on a VNNI CPU here. ``s8s8`` (full int8 weights) is what TensorRT needs and
what VNNI and ARM dot-product CPUs run exactly; it saturates on x86 CPUs without VNNI.
``benchmarks/results/cpu-cifar10-conv4-int8-schemes*.md`` has the measurements.

The same file serves ONNX Runtime on a CPU and TensorRT's explicit quantization. TensorRT
accepts only symmetric quantization (zero points of 0) and int8 (not int32) Q/DQ, so
``tensorrt=True`` writes int8 symmetric activations and keeps biases in float (``QuantizeBias``
off); ``compress export`` does so whenever an int8 TensorRT engine is asked for.

The fp32 file's ``metadata_props`` (the model spec that the runtime loader reads) are copied
into the int8 file.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..checks import choice, number
from ..errors import CompressorError
from ..files import atomic_path

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_IMAGES = 512
DEFAULT_METHOD = "minmax"
MIN_AGREEMENT = 0.95  # top-1 agreement with PyTorch that an int8 artifact must reach (fp32 ones: 0.99)
CALIBRATION_BATCH = 32  # images per calibration call (the graph has a dynamic batch axis)
HISTOGRAM_BINS = 2048  # entropy and percentile: histogram resolution of each activation
QUANTIZED_BINS = 128  # entropy: the int8 half-range that candidate thresholds are judged at (TensorRT's choice)
PERCENTILE = 99.999  # percentile: share of each activation's values that the range keeps
QUANTIZATION_KEY = "compressor.quantization"  # metadata: how the int8 file was made
# scheme -> (activation type, weight type, reduce_range); see the module's docstring
SCHEMES = {"u8u8": ("QUInt8", "QUInt8", False), "s8s8": ("QInt8", "QInt8", False),
           "s8s8-reduced": ("QInt8", "QInt8", True)}
DEFAULT_SCHEME = "s8s8-reduced"


def calibration_images(data, count: int = DEFAULT_IMAGES, seed: int = 0) -> torch.Tensor:
    """``count`` training images (all of them if fewer), drawn with ``seed``, normalised like the model's inputs.

    Normalisation is :class:`compressor.data.DeviceBatches`'s for evaluation (no crop, no flip):
    ``(x / 255 - mean) / std`` with the data set's per-channel statistics.
    """
    number("--calibration-images", count, integer=True, low=1)
    n = len(data.train_y)
    if n == 0:
        raise CompressorError(f"{data.name} has no training images to calibrate int8 on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)].sort().values
    x = data.train_x[order].float() / 255.0
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    choice("--calibration-method", name, METHODS)
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def _histogram_ranges(model_path: Path, work: Path, reader, method: str, symmetric: bool, bins: int) -> dict:
    """{tensor: [{"rmin", "rmax"}]} from ONNX Runtime's entropy or percentile calibrator at ``bins`` bins."""
    from onnxruntime.quantization import create_calibrator

    options = {"num_bins": bins, "symmetric": symmetric}
    options |= {"num_quantized_bins": QUANTIZED_BINS} if method == "entropy" else {"percentile": PERCENTILE}
    calibrator = create_calibrator(model_path, None, augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=_method(method), extra_options=options)
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    overrides = {}
    for name, data in ranges.data.items():
        low, high = (np.asarray(v, dtype=np.float32).reshape(()) for v in (data.lowest, data.highest))
        overrides[name] = [{"rmin": low, "rmax": high}]
    return overrides


def _reader(input_name: str, images: torch.Tensor, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = [b.numpy().astype(np.float32) for b in images.split(batch)]
            self.position = 0

        def get_next(self):
            if self.position >= len(self.batches):
                return None
            self.position += 1
            return {input_name: self.batches[self.position - 1]}

        def rewind(self):  # entropy and percentile read the data twice
            self.position = 0

    return Reader()


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizer logs its advice at INFO/WARNING and prints its progress; keep errors only."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def quantize(fp32_path: str | os.PathLike, out_path: str | os.PathLike, images: torch.Tensor,
             method: str = DEFAULT_METHOD, per_channel: bool = True, tensorrt: bool = False,
             preprocess: bool = True, histogram_bins: int = HISTOGRAM_BINS, scheme: str = DEFAULT_SCHEME) -> Path:
    """Write ``out_path``: ``fp32_path`` statically quantized to int8 (QDQ), calibrated on ``images``.

    ``images`` are float32 NCHW, already normalised (see :func:`calibration_images`). The file
    is written atomically and checked by ``onnx.checker``; metadata of the fp32 file is kept,
    and how it was quantized is recorded under ``compressor.quantization``. ``tensorrt``: symmetric
    activations and float biases, as TensorRT's explicit quantization needs. ``histogram_bins``:
    resolution of the entropy and percentile histograms (entropy's cost grows with its square).
    ``scheme``: the 8-bit types, one of :data:`SCHEMES` (``tensorrt`` forces ``s8s8``).
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    calibrate = _method(method)
    choice("--int8-scheme", scheme, tuple(SCHEMES))
    if tensorrt:
        scheme = "s8s8"  # TensorRT's explicit quantization: int8, zero points of 0
    activations, weights, reduce_range = SCHEMES[scheme]
    number("histogram_bins", histogram_bins, integer=True, low=2 * QUANTIZED_BINS)
    if not fp32_path.is_file():
        raise CompressorError(f"no ONNX file at {fp32_path}")
    if not torch.is_tensor(images) or images.dim() < 2 or images.shape[0] < 1:  # NCHW images, or a layer's inputs
        raise CompressorError("int8 calibration needs a float tensor of at least one input (NCHW images)")
    source = onnx.load(str(fp32_path), load_external_data=False)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in source.graph.node):
        raise CompressorError(f"{fp32_path.name} is already quantized (it has Q/DQ nodes)")
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in source.graph.initializer):
        raise CompressorError(f"{fp32_path.name} has fp16 weights; int8 quantization starts from an fp32 ONNX")
    if len(source.graph.input) != 1:
        raise CompressorError(f"int8 calibration feeds one input, but {fp32_path.name} has {len(source.graph.input)}")
    input_name = source.graph.input[0].name
    metadata = {p.key: p.value for p in source.metadata_props}
    detail = {"minmax": "", "entropy": f" ({histogram_bins} bins)",
              "percentile": f" ({PERCENTILE}%, {histogram_bins} bins)"}[method]
    bits = {"QInt8": "int8", "QUInt8": "uint8"}
    setting = (f"static QDQ, scheme {scheme}: {bits[weights]}{' 7-bit' if reduce_range else ''} weights "
               f"per-{'channel' if per_channel else 'tensor'} symmetric, {bits[activations]} activations "
               f"{'symmetric' if tensorrt else 'asymmetric'}, {'float' if tensorrt else 'int32'} biases, "
               f"{method}{detail} calibration on {images.shape[0]} images")

    with tempfile.TemporaryDirectory(prefix="compressor-int8-") as work, atomic_path(out_path) as tmp:
        model_in = fp32_path
        if preprocess:
            model_in = Path(work) / "preprocessed.onnx"
            try:
                with _quiet():
                    quant_pre_process(str(fp32_path), str(model_in), skip_symbolic_shape=False)
            except Exception as exc:  # symbolic shape inference cannot handle every graph; ONNX's can
                detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                print(f"onnx-int8: full preprocessing failed ({detail}); using ONNX shape inference only")
                with _quiet():
                    quant_pre_process(str(fp32_path), str(model_in), skip_symbolic_shape=True,
                                      skip_optimization=True)
        reader = _reader(input_name, images.detach().float().cpu(), CALIBRATION_BATCH)
        extra = {"ActivationSymmetric": tensorrt, "WeightSymmetric": True, "QuantizeBias": not tensorrt}
        try:
            with _quiet():
                if method != "minmax":
                    extra["TensorQuantOverrides"] = _histogram_ranges(Path(model_in), Path(work), reader, method,
                                                                      tensorrt, histogram_bins)
                    reader.rewind()
                    calibrate = _method("minmax")  # quick; every activation's range is overridden
                quantize_static(
                    str(model_in), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=getattr(QuantType, activations), weight_type=getattr(QuantType, weights),
                    calibrate_method=calibrate, reduce_range=reduce_range, extra_options=extra,
                )
        except CompressorError:
            raise
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise CompressorError(f"ONNX Runtime could not quantize {fp32_path.name}: {detail}") from exc
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {**metadata, QUANTIZATION_KEY: setting})
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return out_path


def describe(path: str | os.PathLike) -> dict:
    """What an int8 ONNX holds: Q/DQ node counts, and which weights carry per-channel scales."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=False)
    nodes = proto.graph.node
    init = {t.name: t for t in proto.graph.initializer}
    per_channel = []
    for node in nodes:
        if node.op_type != "DequantizeLinear" or node.input[0] not in init:
            continue
        weight = init[node.input[0]]
        scale = numpy_helper.to_array(init[node.input[1]]) if node.input[1] in init else None
        if weight.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and scale is not None and scale.size > 1:
            per_channel.append(node.input[0])
    return {
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in nodes),
        "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in nodes),
        "per_channel_weights": per_channel,
        "setting": next((p.value for p in proto.metadata_props if p.key == QUANTIZATION_KEY), None),
    }
