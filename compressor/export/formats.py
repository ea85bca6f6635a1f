"""The formats ``compress export`` builds, each one registered in :data:`compressor.export.FORMATS`.

A format is one function of a :class:`compressor.export.run.Job`: it writes its artifact under
``job.out``, hands it to ``job.check`` (verified against PyTorch, deleted if it disagrees, then
scored on the test split), adds what it knows to ``job.results[name]`` and records the file in
``job.artifacts[name]`` for the formats built from it. Adding a format is one more registration
here (or anywhere that is imported): the dispatcher, ``parse_formats`` and the CLI's help read
the registry. The runtimes each format needs are imported inside it, so a missing one only
matters when that format is asked for.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import write_metadata
from ..errors import CompressorError
from . import FORMATS, INT8_MAX_RELATIVE_DIFF


def _on(device, runner):
    """``runner`` called on CPU tensors moved to ``device`` first."""
    return lambda x: runner(x.to(device))


@FORMATS.register("onnx", order=10, triton="onnx",
                  help="ONNX (fp32, or fp16 with --onnx-fp16), checked with ONNX Runtime")
def onnx_format(job) -> None:
    from . import onnx

    o = job.options
    path = onnx.export(job.model, job.out / f"{job.stem}.onnx", job.x, opset=o.opset, fp16=o.onnx_fp16,
                       simplify=o.simplify)
    write_metadata(path, job.spec, o.max_batch)  # the spec in metadata_props, for compressor.runtime.load
    job.check("onnx", path, lambda: onnx.OnnxRuntimeModel(path, "cpu"))
    job.results["onnx"] |= {"opset": o.opset, "fp16": o.onnx_fp16, "simplified": o.simplify,
                            "input": onnx.INPUT, "output": onnx.OUTPUT, "exporter": onnx.exporter_of(path)}
    job.artifacts["onnx"] = path


def _refuse_fp16_onnx(options) -> None:
    if options.onnx_fp16:
        raise CompressorError("int8 ONNX is quantized from an fp32 ONNX: drop --onnx-fp16, or export the fp16 "
                              "ONNX in a separate `compress export`")


@FORMATS.register("onnx-int8", order=20, needs=("onnx",), check=_refuse_fp16_onnx, triton="onnx",
                  help="int8 ONNX: the fp32 ONNX statically quantized by ONNX Runtime (QDQ, per-channel weights)")
def onnx_int8_format(job) -> None:
    from . import onnx, quantize

    o = job.options
    onnx_path = job.artifacts["onnx"]
    for_trt = "trt" in job.names and o.precision == "int8"  # TensorRT: zero points of 0, no int32 bias Q/DQ
    images = quantize.calibration_images(job.data, o.calibration_images, o.calibration_seed)
    path = quantize.quantize(onnx_path, job.out / f"{job.stem}-int8.onnx", images, o.calibration_method,
                             tensorrt=for_trt, scheme=o.int8_scheme)
    job.check("onnx-int8", path, lambda: onnx.OnnxRuntimeModel(path, "cpu"), o.int8_min_agreement,
              max_relative_diff=INT8_MAX_RELATIVE_DIFF)
    graph = quantize.describe(path)
    scheme = "s8s8" if for_trt else o.int8_scheme
    activations, weights, reduce_range = ({"QInt8": "int8", "QUInt8": "uint8"}.get(t, t) if isinstance(t, str) else t
                                          for t in quantize.SCHEMES[scheme])
    job.results["onnx-int8"] |= {
        "from": onnx_path.name, "format": "QDQ", "scheme": scheme,
        "weights": f"{weights}{' (7-bit range)' if reduce_range else ''}, per-channel, symmetric",
        "activations": f"{activations}, {'symmetric' if for_trt else 'asymmetric'}",
        "biases": "float" if for_trt else "int32",
        "calibration": {"method": o.calibration_method, "images": int(images.shape[0]), "split": "train",
                        "seed": o.calibration_seed},
        "quantize_linear": graph["quantize_linear"], "dequantize_linear": graph["dequantize_linear"],
        "per_channel_weights": len(graph["per_channel_weights"]),
    }
    job.artifacts["onnx-int8"] = path


@FORMATS.register("aoti", order=30, help="AOTInductor package (.pt2) for this machine's GPU, or its CPU")
def aoti_format(job) -> None:
    from . import aoti

    o = job.options
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = aoti.export(job.model, job.out / f"{job.stem}-{device}.pt2", job.x, device, max_batch=o.max_batch)
    write_metadata(path, job.spec, o.max_batch)  # the spec in the sidecar path.json, for compressor.runtime.load
    job.check("aoti", path, lambda: _on(device, aoti.AOTIModel(path)), limit=o.max_batch)
    job.results["aoti"]["device"] = device
    job.artifacts["aoti"] = path


def _trt_needs(options) -> tuple[str, ...]:
    """An engine is built from the fp32 ONNX, and an int8 one with explicit Q/DQ from the int8 ONNX too."""
    return ("onnx", "onnx-int8") if options.precision == "int8" and options.trt_int8 == "qdq" else ("onnx",)


def _trt_check(options) -> None:
    from . import tensorrt

    if options.precision == "int8":
        tensorrt.plan_int8(tensorrt.major_version(tensorrt.require()), options.trt_int8)  # 11+: no calibrator


@FORMATS.register("trt", order=40, needs=_trt_needs, check=_trt_check, tensorrt=True, triton="trt",
                  help="TensorRT engine (--trt-precision fp32/fp16/int8; NVIDIA GPU and TensorRT only)")
def trt_format(job) -> None:
    from ..data import DeviceBatches
    from . import onnx, tensorrt

    o = job.options
    onnx_path = job.artifacts["onnx"]
    calibration = None
    if o.precision == "int8" and o.trt_int8 == "calibrator":  # TensorRT 10's implicit, deprecated path
        calibration = [b for b, _ in DeviceBatches(job.data, "train", o.opt_batch, "cuda")][:16]
    if o.precision == "int8" and o.trt_int8 == "qdq":
        onnx_path = job.artifacts["onnx-int8"]  # explicit quantization: the scales are in the verified Q/DQ file
    if tensorrt.wants_fp16_onnx(o.precision):
        onnx_path = onnx.export(job.model, job.out / f"{job.stem}-fp16.onnx", job.x, opset=o.opset, fp16=True)
    engine = tensorrt.build_engine(onnx_path, job.out / f"{job.stem}-{o.precision}.engine", precision=o.precision,
                                   min_batch=o.min_batch, opt_batch=o.opt_batch, max_batch=o.max_batch,
                                   workspace_gib=o.workspace_gib, timing_cache=job.out / "timing.cache",
                                   calibration_batches=calibration,
                                   calibration_cache=job.out / f"{job.stem}-int8.calib",
                                   source_sha256=job.results["source_sha256"])
    write_metadata(engine, job.spec, o.max_batch)  # the spec in the engine's sidecar, for compressor.runtime.load
    job.check("trt", engine, lambda: _on("cuda", tensorrt.TensorRTModel(engine)),
              o.int8_min_agreement if o.precision == "int8" else o.min_agreement, limit=o.max_batch,
              max_relative_diff=INT8_MAX_RELATIVE_DIFF if o.precision == "int8" else None)
    job.results["trt"] |= {"precision": o.precision, "onnx": Path(onnx_path).name}
    if o.precision == "int8":
        job.results["trt"]["int8"] = o.trt_int8
    job.artifacts["trt"] = engine
