"""Benchmark backends: each turns a PyTorch model into a callable on device tensors.

``eager``    the module itself (channels_last and fp16/bf16 on a GPU)
``compile``  torch.compile, ``--compile-mode`` default (fast to build), reduce-overhead or
             max-autotune (both capture CUDA graphs on a GPU), or max-autotune-no-cudagraphs
``aoti``     an AOTInductor package, compiled once for every batch size
``ort``      ONNX Runtime (CPU, or the CUDA provider when onnxruntime-gpu is installed); precision
             int8 is a QDQ ONNX quantized statically here (random calibration: latency only)
``trt``      a TensorRT engine (GPU and TensorRT only)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..errors import CompressorError

BACKENDS = ("eager", "compile", "aoti", "ort", "trt")
GPU_ONLY = {"trt": "TensorRT engines run only on NVIDIA GPUs"}
PRECISIONS = ("fp32", "fp16", "int8")
INT8_BACKENDS = ("ort",)  # int8 is benchmarked as an int8 ONNX on ONNX Runtime; other backends skip it
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Prepared:
    fn: Callable[[torch.Tensor], torch.Tensor]
    input_dtype: torch.dtype
    cuda_graphs: bool
    note: str = ""
    artifact: Path | None = None  # the file this backend runs, when it runs one
    format: str = ""  # pt, onnx, pt2, engine


def applies(backend: str, precision: str) -> bool:
    """Whether ``backend`` is benchmarked at ``precision`` (int8 only on ONNX Runtime)."""
    return precision != "int8" or backend in INT8_BACKENDS


def parse_backends(text: str | None, device: torch.device) -> list[str]:
    names = [b.strip() for b in (text or "eager,ort").split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise CompressorError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    for b in names:
        if b in GPU_ONLY and device.type != "cuda":
            raise CompressorError(f"backend {b!r} needs a CUDA GPU ({GPU_ONLY[b]}); this run is on {device.type}")
    if "trt" in names:
        from ..export import tensorrt

        tensorrt.require()  # fail now, not after the other backends have run
    return names


def check_precision(precision: str | list[str], device: torch.device) -> list[str]:
    """The precisions of ``"fp32,fp16"`` (or a list), each known and possible on ``device``."""
    names = ([p.strip() for p in precision.split(",") if p.strip()] if isinstance(precision, str)
             else list(precision or []))
    if not names:
        raise CompressorError("--precision needs at least one of " + ", ".join(PRECISIONS))
    for p in names:
        if p not in PRECISIONS:
            raise CompressorError(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
        if p == "fp16" and device.type != "cuda":
            raise CompressorError("fp16 benchmarks are for GPUs; on a CPU use --precision fp32")
    return list(dict.fromkeys(names))


def check_compile_mode(mode: str) -> str:
    from ..checks import choice

    return choice("--compile-mode", mode, COMPILE_MODES)


def prepare(backend: str, model: nn.Module, example: torch.Tensor, device: torch.device, precision: str,
            workdir: Path, label: str, max_batch: int, compile_mode: str = "default",
            checkpoint: Path | None = None) -> Prepared:
    """Build ``backend``'s runnable form of ``model`` (artifacts go to ``workdir``)."""
    if not applies(backend, precision):
        raise CompressorError(f"precision {precision} is benchmarked on {', '.join(INT8_BACKENDS)} only, not {backend}")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    workdir.mkdir(parents=True, exist_ok=True)
    if backend == "eager":
        return Prepared(model, dtype, False, artifact=checkpoint, format="pt")
    if backend == "compile":
        import torch._dynamo as dynamo

        # one graph per model x precision x batch size, all on the same forward code
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
        mode = check_compile_mode(compile_mode)
        graphs = device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
        return Prepared(torch.compile(model, mode=mode, dynamic=False), dtype, graphs,
                        note=f"mode {mode}, one graph per batch size", artifact=checkpoint, format="pt")
    if backend == "aoti":
        from ..export import aoti

        path = aoti.export(model, workdir / f"{label}-{device.type}-{precision}.pt2", example.to(device, dtype),
                           device.type, max_batch=max_batch, fp16=precision == "fp16")
        return Prepared(aoti.AOTIModel(path), dtype, False, artifact=path, format="pt2")
    if backend == "ort":
        from ..export import onnx

        if precision == "int8":
            fp32 = onnx.export(model, workdir / f"{label}-fp32.onnx", example)
            path = quantize_int8(fp32, workdir / f"{label}-int8.onnx", example)
        else:
            path = onnx.export(model, workdir / f"{label}-{precision}.onnx", example, fp16=precision == "fp16")
        return Prepared(onnx.OnnxRuntimeModel(path, device.type), torch.float32, False,
                        note="IOBinding on CUDA" if device.type == "cuda" else "CPU provider",
                        artifact=path, format="onnx")
    if backend == "trt":
        from ..export import onnx, tensorrt

        fp16_onnx = tensorrt.wants_fp16_onnx(precision)
        onnx_path = onnx.export(model, workdir / f"{label}-{'fp16' if fp16_onnx else 'fp32'}.onnx", example,
                                fp16=fp16_onnx)
        engine = tensorrt.build_engine(onnx_path, workdir / f"{label}-{precision}.engine", precision=precision,
                                       min_batch=1, opt_batch=min(32, max_batch), max_batch=max_batch)
        return Prepared(tensorrt.TensorRTModel(engine), torch.float32, False, artifact=engine, format="engine")
    raise CompressorError(f"unknown backend {backend!r}")


def quantize_int8(fp32_onnx: Path, path: Path, example: torch.Tensor, calibration_batches: int = 4) -> Path:
    """A static int8 QDQ ONNX of ``fp32_onnx`` (per-channel weights), calibrated on random
    normal inputs: the same graph and kernels as a calibrated file, so the same latency, but
    not its accuracy (``compress export --formats onnx-int8`` writes and verifies the int8
    artifact that is deployed; its quantizer is used here when this checkout has it)."""
    images = torch.randn((8 * calibration_batches, *example.shape[1:]), generator=torch.Generator().manual_seed(0))
    try:
        from ..export.quantize import quantize
    except ImportError:
        quantize = None
    if quantize is not None:
        return quantize(fp32_onnx, path, images)
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ..files import atomic_path

    class Random(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": b.numpy()} for b in images.split(8)])

        def get_next(self):
            return next(self.batches, None)

    with atomic_path(path) as tmp:
        quantize_static(str(fp32_onnx), str(tmp), Random(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return path
