"""A Triton Inference Server model repository for an exported artifact.

Layout: ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/model.onnx`` (or ``model.plan`` for a
TensorRT engine). The config declares the I/O names and per-image shapes, the max batch
size, and dynamic batching, so the server groups single requests into GPU-sized batches.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import CompressorError
from ..files import atomic_path, write_text

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "trt": ("tensorrt_plan", "model.plan")}


def config_pbtxt(name: str, platform: str, input_name: str, output_name: str, input_shape, num_classes: int,
                 max_batch: int) -> str:
    dims = ", ".join(str(int(d)) for d in input_shape)
    preferred = sorted({b for b in (8, 32, 128, max_batch) if b <= max_batch})
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {{
    name: "{input_name}"
    data_type: TYPE_FP32
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "{output_name}"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {", ".join(str(b) for b in preferred)} ]
  max_queue_delay_microseconds: 100
}}
"""


def write_repository(repo: str | os.PathLike, name: str, artifact: str | os.PathLike, kind: str, input_name: str,
                     output_name: str, input_shape, num_classes: int, max_batch: int) -> Path:
    """Copy ``artifact`` (kind 'onnx' or 'trt') into a Triton repository; returns the model folder."""
    if kind not in PLATFORMS:
        raise CompressorError(f"Triton repositories take onnx or trt artifacts, not {kind!r}")
    platform, filename = PLATFORMS[kind]
    folder = Path(repo) / name
    with atomic_path(folder / "1" / filename) as tmp:
        shutil.copyfile(artifact, tmp)
    write_text(folder / "config.pbtxt",
               config_pbtxt(name, platform, input_name, output_name, input_shape, num_classes, max_batch))
    return folder
