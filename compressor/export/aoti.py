"""AOTInductor packages: the model compiled ahead of time into a ``.pt2`` a C++ or Python
service loads without the model's Python code. Built with ``torch.export`` (dynamic
batch) and ``torch._inductor.aoti_compile_and_package``.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CompressorError
from ..files import atomic_path


def export(model: nn.Module, path: str | os.PathLike, example_inputs: torch.Tensor, device: str = "cpu",
           max_batch: int = 1024, fp16: bool = False) -> Path:
    """Compile ``model`` for ``device`` ('cpu' or 'cuda') into the package ``path`` (must end in .pt2)."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise CompressorError(f"an AOTInductor package must end in .pt2, not {path.name}")
    if device == "cuda" and not torch.cuda.is_available():
        raise CompressorError("AOTInductor for CUDA needs a CUDA GPU; this machine has none (use device cpu)")
    dtype = torch.float16 if fp16 else torch.float32
    model = copy.deepcopy(model).eval().to(device=device, dtype=dtype)
    if device == "cuda":
        model.to(memory_format=torch.channels_last)
    x = torch.cat([example_inputs[:1]] * 2).to(device=device, dtype=dtype)  # a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        with torch.no_grad():
            program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        with atomic_path(path) as tmp:
            package = tmp.with_suffix(".pt2")  # the packager insists on the suffix
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=str(package))
                os.replace(package, tmp)
            finally:
                package.unlink(missing_ok=True)
    except CompressorError:
        raise
    except Exception as exc:  # noqa: BLE001 - compiler failures are many; report one line
        raise CompressorError(f"AOTInductor could not compile the model for {device}: {type(exc).__name__}: {exc}") from exc
    return path


class AOTIModel:
    """A loaded ``.pt2`` package, called like a module on tensors of its device and dtype."""

    def __init__(self, path: str | os.PathLike):
        if not Path(path).is_file():
            raise CompressorError(f"no AOTInductor package at {path}")
        self.runner = torch._inductor.aoti_load_package(str(path))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x)
