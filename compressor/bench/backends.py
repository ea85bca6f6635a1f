"""Benchmark backends: each turns a PyTorch model into a callable on device tensors.

``eager``    the module itself (channels_last and fp16/bf16 on a GPU)
``compile``  torch.compile, ``--compile-mode`` default (fast to build), reduce-overhead or
             max-autotune (both capture CUDA graphs on a GPU), or max-autotune-no-cudagraphs
``aoti``     an AOTInductor package, compiled once for every batch size
``ort``      ONNX Runtime (CPU, or the CUDA provider when onnxruntime-gpu is installed); precision
             int8 is a QDQ ONNX quantized statically here (random calibration: latency only)
``trt``      a TensorRT engine (GPU and TensorRT only)

Each is one entry of :data:`BACKENDS`, registered beside the function that builds it: a
function ``(model, build: Build) -> Prepared``. :func:`parse_backends`, :func:`check_precision`,
:func:`prepare`, the bench loop, the report and the CLI's help read names and settings from the
registry, so adding a backend is one registration. An entry's ``info``: ``help`` (one line),
``precisions`` (those it is benchmarked at; default fp32 and fp16), ``gpu_only`` (why it needs a
CUDA GPU, where it does), ``tensorrt`` (True: needs TensorRT, checked before anything runs),
``default`` (True: benchmarked when ``--backends`` is not given), ``channels_last`` (True: it
runs the PyTorch module, so on a GPU its inputs are channels_last like its weights), ``release`` (a function called
after the backend's points, to free what it cached) and ``accuracy`` (where the report finds the
top-1 of what it runs: ``"pytorch"`` for the run's own fp32 accuracy, else the export format
whose ``export.json`` entry holds it), ``runtime`` (the distributions whose version its timings depend on,
beside torch's: a latency table measured with another version is measured again).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..errors import CompressorError
from ..registry import Registry

BACKENDS = Registry("bench backend")
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_PRECISIONS = ("fp32", "fp16")  # a backend's, unless its entry says otherwise
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class Prepared:
    fn: Callable[[torch.Tensor], torch.Tensor]
    input_dtype: torch.dtype
    cuda_graphs: bool
    note: str = ""
    artifact: Path | None = None  # the file this backend runs, when it runs one
    format: str = ""  # pt, onnx, pt2, engine


@dataclass
class Build:
    """What a backend's build function is given beside the model (already a copy, in eval mode, on
    ``device`` in ``dtype``, channels_last on a GPU)."""
    example: torch.Tensor  # one example input batch (CPU, float32)
    device: torch.device
    precision: str  # fp32, fp16 or int8
    dtype: torch.dtype  # the model's parameters' dtype for that precision
    workdir: Path  # where artifacts go (it exists)
    label: str  # dense or pruned: the start of each artifact's file name
    max_batch: int  # the largest batch size it will be called with
    compile_mode: str = "default"
    checkpoint: Path | None = None  # the checkpoint the model came from
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default)
    spinning: bool = True  # ONNX Runtime's pool threads spin after a run (off: they sleep; see latency.timing)


def _precisions(backend: str) -> tuple[str, ...]:
    return tuple(BACKENDS.get(backend).info.get("precisions", DEFAULT_PRECISIONS))


def backends_for(precision: str) -> list[str]:
    """The backends benchmarked at ``precision``."""
    return [e.name for e in BACKENDS if precision in e.info.get("precisions", DEFAULT_PRECISIONS)]


def default_backends() -> list[str]:
    """What ``--backends`` means when not given (eager,ort)."""
    return [e.name for e in BACKENDS if e.info.get("default")]


def applies(backend: str, precision: str) -> bool:
    """Whether ``backend`` is benchmarked at ``precision`` (int8 only on ONNX Runtime)."""
    return precision in _precisions(backend)


def parse_backends(text: str | None, device: torch.device, precisions: list[str] | None = None) -> list[str]:
    """The backends of ``"eager,ort"`` (default: those registered with ``default``), each known and
    possible on ``device``; with ``precisions``, each of those must be benchmarked on one of them."""
    names = [b.strip() for b in (text or ",".join(default_backends())).split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise CompressorError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS.names())}")
    for b in names:
        why = BACKENDS.get(b).info.get("gpu_only")
        if why and device.type != "cuda":
            raise CompressorError(f"backend {b!r} needs a CUDA GPU ({why}); this run is on {device.type}")
    if any(BACKENDS.get(b).info.get("tensorrt") for b in names):
        from ..export import tensorrt

        tensorrt.require()  # fail now, not after the other backends have run
    for p in precisions or []:
        if not any(applies(b, p) for b in names):
            raise CompressorError(f"{p} is benchmarked on {', '.join(backends_for(p))} only; add it to --backends")
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
            checkpoint: Path | None = None, threads: int | None = None, spinning: bool = True) -> Prepared:
    """Build ``backend``'s runnable form of ``model`` (artifacts go to ``workdir``)."""
    entry = BACKENDS.get(backend)
    if not applies(backend, precision):
        raise CompressorError(f"precision {precision} is benchmarked on {', '.join(backends_for(precision))} only, "
                              f"not {backend}")
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    workdir.mkdir(parents=True, exist_ok=True)
    return entry.target(model, Build(example, device, precision, dtype, workdir, label, max_batch, compile_mode,
                                     checkpoint, threads, spinning))


def release(backend: str) -> None:
    """Free what ``backend`` cached for its points (torch.compile's graphs), where its entry says how."""
    hook = BACKENDS.get(backend).info.get("release") if backend in BACKENDS else None
    if hook:
        hook()


@BACKENDS.register("eager", default=True, accuracy="pytorch", channels_last=True,
                   help="the module itself (channels_last and fp16 on a GPU)")
def build_eager(model: nn.Module, b: Build) -> Prepared:
    return Prepared(model, b.dtype, False, artifact=b.checkpoint, format="pt")


def _reset_dynamo() -> None:
    torch._dynamo.reset()


@BACKENDS.register("compile", accuracy="pytorch", channels_last=True, release=_reset_dynamo,
                   help="torch.compile (--compile-mode), one graph per batch size")
def build_compile(model: nn.Module, b: Build) -> Prepared:
    import torch._dynamo as dynamo

    # one graph per model x precision x batch size, all on the same forward code
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    mode = check_compile_mode(b.compile_mode)
    graphs = b.device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    return Prepared(torch.compile(model, mode=mode, dynamic=False), b.dtype, graphs,
                    note=f"mode {mode}, one graph per batch size", artifact=b.checkpoint, format="pt")


@BACKENDS.register("aoti", accuracy="aoti", help="an AOTInductor package, compiled once for every batch size")
def build_aoti(model: nn.Module, b: Build) -> Prepared:
    from ..export import aoti

    path = aoti.export(model, b.workdir / f"{b.label}-{b.device.type}-{b.precision}.pt2",
                       b.example.to(b.device, b.dtype), b.device.type, max_batch=b.max_batch,
                       fp16=b.precision == "fp16")
    return Prepared(aoti.AOTIModel(path), b.dtype, False, artifact=path, format="pt2")


@BACKENDS.register("ort", default=True, precisions=PRECISIONS, accuracy="onnx",
                   runtime=("onnxruntime-gpu", "onnxruntime"),
                   help="ONNX Runtime (CPU, or CUDA with onnxruntime-gpu); int8: a QDQ ONNX")
def build_ort(model: nn.Module, b: Build) -> Prepared:
    from ..export import onnx

    if b.precision == "int8":
        fp32 = onnx.export(model, b.workdir / f"{b.label}-fp32.onnx", b.example)
        path = quantize_int8(fp32, b.workdir / f"{b.label}-int8.onnx", b.example)
    else:
        path = onnx.export(model, b.workdir / f"{b.label}-{b.precision}.onnx", b.example,
                           fp16=b.precision == "fp16")
    return Prepared(onnx.OnnxRuntimeModel(path, b.device.type, b.threads, quiet=True, spinning=b.spinning),
                    torch.float32, False,
                    note="IOBinding on CUDA" if b.device.type == "cuda" else "CPU provider",
                    artifact=path, format="onnx")


@BACKENDS.register("trt", gpu_only="TensorRT engines run only on NVIDIA GPUs", tensorrt=True, accuracy="trt",
                   runtime=("tensorrt",),
                   help="a TensorRT engine (NVIDIA GPU and TensorRT only)")
def build_trt(model: nn.Module, b: Build) -> Prepared:
    from ..export import onnx, tensorrt

    fp16_onnx = tensorrt.wants_fp16_onnx(b.precision)
    onnx_path = onnx.export(model, b.workdir / f"{b.label}-{'fp16' if fp16_onnx else 'fp32'}.onnx", b.example,
                            fp16=fp16_onnx)
    engine = tensorrt.build_engine(onnx_path, b.workdir / f"{b.label}-{b.precision}.engine", precision=b.precision,
                                   min_batch=1, opt_batch=min(32, b.max_batch), max_batch=b.max_batch)
    return Prepared(tensorrt.TensorRTModel(engine), torch.float32, False, artifact=engine, format="engine")


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
