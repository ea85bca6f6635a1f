"""ONNX export with a dynamic batch axis, checked by onnx.checker and run by ONNX Runtime.

The TorchScript-based exporter (``dynamo=False``) is used because it needs only the
``onnx`` package; the dynamo exporter also needs onnxscript, which GPU images often lack.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import CompressorError
from ..files import atomic_path

INPUT, OUTPUT = "input", "logits"


def export(model: nn.Module, path: str | os.PathLike, example_inputs: torch.Tensor, opset: int = 17,
           fp16: bool = False, simplify: bool = False) -> Path:
    """Write ``model`` as ONNX (batch axis dynamic). ``fp16`` converts weights and math, keeping fp32 I/O."""
    import onnx

    if opset < 17:
        raise CompressorError(f"ONNX opset must be 17 or higher, got {opset}")
    model = copy.deepcopy(model).float().cpu().eval().to(memory_format=torch.contiguous_format)
    x = example_inputs[:1].float().cpu()
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (x,), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=opset,
                          dynamo=False)
        proto = onnx.load(str(tmp))
        if simplify:
            proto = _simplify(proto)
        if fp16:
            proto = _to_fp16(proto)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return path


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
    """An ONNX file behind ONNX Runtime, called like a module on torch tensors.

    On CUDA, inputs and outputs stay on the GPU through IOBinding (torch owns the buffers),
    so timings do not include a hidden host round trip.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise CompressorError(f"no ONNX file at {path}")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.device = device
        self.session = ort.InferenceSession(str(path), options, providers=providers(device))
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.output_shape = self.session.get_outputs()[0].shape  # ["batch", classes]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.device == "cpu":
            out = self.session.run([self.output_name], {self.input_name: x.detach().float().cpu().numpy()})[0]
            return torch.from_numpy(out)
        x = x.detach().float().contiguous()
        out = torch.empty((x.shape[0], *self.output_shape[1:]), device=x.device, dtype=torch.float32)
        index = x.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", index, np.float32, tuple(out.shape), out.data_ptr())
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out
