"""Benchmark backends: each turns a PyTorch model into a callable on device tensors.

``eager``    the module itself (channels_last and fp16/bf16 on a GPU)
``compile``  torch.compile; on a GPU mode max-autotune, which also captures CUDA graphs
``aoti``     an AOTInductor package, compiled once for every batch size
``ort``      ONNX Runtime (CPU, or the CUDA provider when onnxruntime-gpu is installed)
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
PRECISIONS = ("fp32", "fp16")


@dataclass
class Prepared:
    fn: Callable[[torch.Tensor], torch.Tensor]
    input_dtype: torch.dtype
    cuda_graphs: bool
    note: str = ""


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


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise CompressorError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise CompressorError("fp16 benchmarks are for GPUs; on a CPU use --precision fp32")


def prepare(backend: str, model: nn.Module, example: torch.Tensor, device: torch.device, precision: str,
            workdir: Path, label: str, max_batch: int) -> Prepared:
    """Build ``backend``'s runnable form of ``model`` (artifacts go to ``workdir``)."""
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    workdir.mkdir(parents=True, exist_ok=True)
    if backend == "eager":
        return Prepared(model, dtype, False)
    if backend == "compile":
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)  # one graph per batch size
        mode = "max-autotune" if device.type == "cuda" else "default"
        return Prepared(torch.compile(model, mode=mode, dynamic=False), dtype, device.type == "cuda",
                        note=f"mode {mode}, one graph per batch size")
    if backend == "aoti":
        from ..export import aoti

        path = aoti.export(model, workdir / f"{label}-{device.type}-{precision}.pt2", example.to(device, dtype),
                           device.type, max_batch=max_batch, fp16=precision == "fp16")
        return Prepared(aoti.AOTIModel(path), dtype, False)
    if backend == "ort":
        from ..export import onnx

        path = onnx.export(model, workdir / f"{label}-{precision}.onnx", example, fp16=precision == "fp16")
        return Prepared(onnx.OnnxRuntimeModel(path, device.type), torch.float32, False,
                        note="IOBinding on CUDA" if device.type == "cuda" else "CPU provider")
    if backend == "trt":
        from ..export import onnx, tensorrt

        fp16_onnx = tensorrt.wants_fp16_onnx(precision)
        onnx_path = onnx.export(model, workdir / f"{label}-{'fp16' if fp16_onnx else 'fp32'}.onnx", example,
                                fp16=fp16_onnx)
        engine = tensorrt.build_engine(onnx_path, workdir / f"{label}-{precision}.engine", precision=precision,
                                       min_batch=1, opt_batch=min(32, max_batch), max_batch=max_batch)
        return Prepared(tensorrt.TensorRTModel(engine), torch.float32, False)
    raise CompressorError(f"unknown backend {backend!r}")
