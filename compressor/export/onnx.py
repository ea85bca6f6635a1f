"""ONNX export with a dynamic batch axis, checked by onnx.checker and run by ONNX Runtime.

The TorchScript-based exporter (``dynamo=False``) is tried first because it needs only the
``onnx`` package; the dynamo exporter also needs onnxscript, which GPU images often lack.
Where the TorchScript exporter cannot export a model (e.g. an adaptive average pool whose
output size does not divide its input, as torchvision's VGGs at 64x64), the dynamo
exporter is used when onnxscript is installed, and otherwise one error says what to do.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

from ..artifacts import MAX_BATCH_KEY, SPEC_KEY, read_onnx_metadata, write_onnx_metadata  # noqa: F401
from ..checks import number
from ..errors import CompressorError
from ..files import atomic_path

INPUT, OUTPUT = "input", "logits"
MIN_OPSET = 17
EXPORTER_KEY = "compressor.exporter"  # metadata: which torch exporter wrote the file ("torchscript" or "dynamo")


def max_opset() -> int:
    """The newest opset both torch's exporter and the installed onnx know."""
    import onnx

    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # a private constant; without it, trust onnx
        ONNX_MAX_OPSET = onnx.defs.onnx_opset_version()
    return min(int(ONNX_MAX_OPSET), onnx.defs.onnx_opset_version())


def check_opset(opset) -> int:
    return number("--opset", opset, integer=True, low=MIN_OPSET, high=max_opset())


def export(model: nn.Module, path: str | os.PathLike, example_inputs: torch.Tensor, opset: int = 17,
           fp16: bool = False, simplify: bool = False, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as ONNX (batch axis dynamic). ``fp16`` converts weights and math, keeping fp32 I/O.

    ``metadata`` (str -> str, e.g. ``{SPEC_KEY: json}``) goes into ``metadata_props``, set after the
    fp16 / simplify conversions so that neither can drop it.
    """
    import onnx

    check_opset(opset)
    model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    x = example_inputs[:1].float().cpu()
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        exporter = _export_graph(model, x, str(tmp), opset)
        proto = onnx.load(str(tmp))
        if simplify:
            proto = _simplify(proto)
        if fp16:
            proto = _to_fp16(proto)
        onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **(metadata or {}),
                                            EXPORTER_KEY: exporter})
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return path


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress lines, notices, and the TorchScript graph they print on failure."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if sys.stdout is not None:
        sys.stdout.flush()
    try:  # the TorchScript exporter's C++ log writes its graph to file descriptor 1 itself
        saved = os.dup(1)
        sink = os.open(os.devnull, os.O_WRONLY)
        os.dup2(sink, 1)
        os.close(sink)
    except OSError:
        saved = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_graph(model: nn.Module, x: torch.Tensor, path: str, opset: int) -> str:
    """Export with the TorchScript exporter, or else the dynamo one; returns which one wrote ``path``."""
    kwargs = dict(input_names=[INPUT], output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                  opset_version=opset)
    try:
        with _quiet():
            torch.onnx.export(model, (x,), path, dynamo=False, **kwargs)
        return "torchscript"
    except getattr(torch.onnx, "OnnxExporterError", RuntimeError) as exc:  # what the exporter cannot convert
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    pool = "not factor of input size" in reason  # an adaptive pool that does not divide its input: dynamo can
    pool_hint = (f"; or give the model an input size at which each adaptive pool's output size divides its input "
                 f"(this input is {tuple(x.shape[1:])})") if pool else ""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError:
        raise CompressorError(
            f"the TorchScript ONNX exporter cannot export this model ({reason[:200]}); the dynamo exporter "
            f"{'can' if pool else 'may'}, but needs onnxscript: pip install onnxscript "
            f"(or pip install -e '.[onnx-extras]'){pool_hint}"
        ) from None
    try:
        with _quiet():
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False, **kwargs)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CompressorError(f"neither ONNX exporter can export this model: TorchScript: {reason[:200]}; "
                              f"dynamo: {detail}{pool_hint}") from exc
    return "dynamo"


def exporter_of(path: str | os.PathLike) -> str | None:
    """Which torch exporter wrote an ONNX file of ours ("torchscript" or "dynamo"); None if not recorded."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in proto.metadata_props if p.key == EXPORTER_KEY), None)


read_metadata = read_onnx_metadata  # one implementation, in compressor.artifacts
write_metadata = write_onnx_metadata


def _simplify(proto):
    try:
        import onnxslim
    except ImportError:
        raise CompressorError("--onnx-simplify needs onnxslim: pip install onnxslim") from None
    return onnxslim.slim(proto)


def _to_fp16(proto):
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise CompressorError("fp16 ONNX needs onnxconverter-common: pip install onnxconverter-common") from None
    return float16.convert_float_to_float16(proto, keep_io_types=True)


def providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for ``device`` ('cpu' or 'cuda'), or one clear error."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise CompressorError(
            "ONNX Runtime's CUDA provider is not installed (this onnxruntime has "
            f"{', '.join(ort.get_available_providers())}); pip install onnxruntime-gpu on a CUDA machine"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxRuntimeModel:
    """An ONNX model (a file, or its bytes) behind ONNX Runtime, called like a module on torch tensors.

    The one ONNX Runtime wrapper of the toolkit: export verification, the runtime loader, the
    bench and the latency tables all run through it, so what is timed is what is served. Inputs
    are fed in the graph's own float type. On CUDA (``device`` "cuda" or "cuda:N"), inputs and
    outputs stay on that GPU through IOBinding with torch owning both buffers: torch's stream
    is synchronised before the run and ONNX Runtime's outputs after it, so timings include no
    hidden host round trip and no race with the kernels that made the input.
    """

    TYPES: ClassVar[dict] = {"tensor(float)": (np.float32, torch.float32),
                             "tensor(float16)": (np.float16, torch.float16),
                             "tensor(double)": (np.float64, torch.float64)}

    def __init__(self, model: str | os.PathLike | bytes, device: str | torch.device = "cpu",
                 threads: int | None = None, quiet: bool = False, spinning: bool = True):
        import onnxruntime as ort

        if not isinstance(model, bytes) and not Path(model).is_file():
            raise CompressorError(f"no ONNX file at {model}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        self.device = device
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        if quiet:
            options.log_severity_level = 3
        if not spinning:  # pool threads sleep after a run instead of spinning (many sessions share the cores)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        chosen = providers(device.type)  # one clear error when CUDA's provider is missing
        if device.type == "cuda":
            chosen = [("CUDAExecutionProvider", {"device_id": device.index}), "CPUExecutionProvider"]
        where = "the ONNX model" if isinstance(model, bytes) else Path(model).name
        try:
            self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                                providers=chosen)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise CompressorError(f"ONNX Runtime cannot load {where}: {type(exc).__name__}: {exc}") from None
        self.inputs, self.outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_name, self.output_name = self.inputs[0].name, self.outputs[0].name
        self.output_shape = self.outputs[0].shape  # ["batch", classes]
        self.np_dtype, self.input_dtype = self.TYPES.get(self.inputs[0].type, (np.float32, torch.float32))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            feed = x.detach().cpu().numpy().astype(self.np_dtype, copy=False)
            return torch.from_numpy(self.session.run([self.output_name], {self.input_name: feed})[0])
        x = x.detach().to(self.device, torch.float32).contiguous()
        classes = self.output_shape[1:] if all(isinstance(d, int) for d in self.output_shape[1:]) else None
        if classes is None or self.np_dtype != np.float32:
            raise CompressorError("ONNX Runtime on CUDA here needs float32 input and a static output shape; run "
                                  "it on the CPU")
        out = torch.empty((x.shape[0], *classes), device=self.device, dtype=torch.float32)
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", self.device.index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", self.device.index, np.float32, tuple(out.shape),
                            out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # the input is written before ORT reads it
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out
