"""AOTInductor packages: the model compiled ahead of time into a ``.pt2`` a C++ or Python
service loads without the model's Python code. Built with ``torch.export`` (dynamic
batch) and ``torch._inductor.aoti_compile_and_package``.

A package says nothing about its input in a form that is cheap to read, and its runner does
not check input shapes, so :func:`export` records them twice: in the package's own AOTI
metadata (``compressor.*`` keys, read back by ``loader.get_metadata()``) and in a JSON
sidecar ``<name>.pt2.json`` (:func:`sidecar_path`) written before the package, so that a
package on disk always has its sidecar. ``compressor.runtime`` reads both.
"""
from __future__ import annotations

import copy
import json
import os
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from ..artifacts import sidecar_path
from ..errors import CompressorError
from ..files import atomic_path, write_json

SIDECAR_FORMAT = "compressor.aoti/1"
META_PREFIX = "compressor."  # keys of ours in the package's AOTI metadata


def export(model: nn.Module, path: str | os.PathLike, example_inputs: torch.Tensor, device: str = "cpu",
           max_batch: int = 1024, fp16: bool = False, spec=None) -> Path:
    """Compile ``model`` for ``device`` ('cpu' or 'cuda') into the package ``path`` (must end in .pt2).

    Also writes the sidecar ``path.json``: device, dtype, per-image input shape, max batch, torch
    version, and ``spec`` (a checkpoint ``ModelSpec``) when given.
    """
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
    info = {"format": SIDECAR_FORMAT, "device": device, "dtype": str(dtype).removeprefix("torch."),
            "input_shape": [int(d) for d in x.shape[1:]], "min_batch": 1, "max_batch": int(max_batch),
            "torch": torch.__version__}
    if spec is not None:
        from dataclasses import asdict

        info["spec"] = asdict(spec)
    configs = {}
    if isinstance(getattr(torch._inductor.config.aot_inductor, "metadata", None), dict):  # torch >= 2.5
        configs["aot_inductor.metadata"] = {META_PREFIX + k: json.dumps(v) for k, v in info.items()}
    try:
        with torch.no_grad():
            program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
        write_json(sidecar_path(path), info)  # before the package: a package on disk has its sidecar
        with atomic_path(path) as tmp:
            package = tmp.with_suffix(".pt2")  # the packager insists on the suffix
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=str(package),
                                                         inductor_configs=configs or None)
                os.replace(package, tmp)
            finally:
                package.unlink(missing_ok=True)
    except CompressorError:
        sidecar_path(path).unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - compiler failures are many; report one line
        sidecar_path(path).unlink(missing_ok=True)
        raise CompressorError(f"AOTInductor could not compile the model for {device}: "
                              f"{type(exc).__name__}: {exc}") from exc
    return path


def package_metadata(path: str | os.PathLike) -> dict:
    """What a package says about itself, read from the zip without loading its code.

    ``AOTI_DEVICE_KEY`` etc. from torch, and our ``compressor.*`` keys (JSON-decoded, prefix
    dropped) where :func:`export` wrote them. Empty for a file that is not such a package.
    """
    found: dict = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("_metadata.json") and "/aotinductor/" in name and ".kernel" not in name:
                    found.update(json.loads(archive.read(name)))
    except (OSError, zipfile.BadZipFile, ValueError):
        return {}
    for key in [k for k in found if k.startswith(META_PREFIX)]:
        try:
            found[key[len(META_PREFIX):]] = json.loads(found.pop(key))
        except (TypeError, ValueError):
            pass
    return found


class AOTIModel:
    """A loaded ``.pt2`` package, called like a module on tensors of its device and dtype."""

    def __init__(self, path: str | os.PathLike, device_index: int = -1):
        if not Path(path).is_file():
            raise CompressorError(f"no AOTInductor package at {path}")
        self.runner = torch._inductor.aoti_load_package(str(path), device_index=device_index)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(x)
