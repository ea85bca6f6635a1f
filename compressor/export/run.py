"""``compress export``: turn a run's pruned checkpoint into deployable artifacts, each verified.

An artifact that fails verification is deleted, so whatever is left on disk answered
like the PyTorch model on a real batch of the model's own test images.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from .. import checkpoint, data as datasets
from ..checks import choice, number
from ..data import DeviceBatches
from ..errors import CompressorError
from ..files import write_json
from . import parse_formats, verify


def _source(path: Path) -> tuple[Path, Path | None]:
    """(checkpoint, run directory or None) for a run directory or a checkpoint file."""
    if path.is_dir():
        if not (path / "pruned.pt").is_file():
            raise CompressorError(f"{path} has no pruned.pt; give a finished run directory or a checkpoint file")
        return path / "pruned.pt", path
    if not path.is_file():
        raise CompressorError(f"no run directory or checkpoint at {path}")
    return path, None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_options(precision: str = "fp16", opset: int = 17, min_batch: int = 1, opt_batch: int = 32,
                  max_batch: int = 256, workspace_gib: float = 4.0, verify_batch: int = 256,
                  min_agreement: float = 0.99) -> None:
    """Refuse a bad export number (NaN and inf too) with one clear error, before anything is loaded.

    ``compress run --export`` calls this before training, ``export`` before reading its checkpoint.
    """
    from .onnx import check_opset
    from .tensorrt import PRECISIONS

    choice("--trt-precision", precision, PRECISIONS)
    check_opset(opset)
    for flag, value in (("--min-batch", min_batch), ("--opt-batch", opt_batch), ("--max-batch", max_batch),
                        ("verify_batch", verify_batch)):
        number(flag, value, integer=True, low=1)
    if not min_batch <= opt_batch <= max_batch:
        raise CompressorError(f"need 1 <= min batch <= opt batch <= max batch, got {min_batch}, {opt_batch}, {max_batch}")
    number("--workspace-gib", workspace_gib, low=0, low_open=True)
    number("min_agreement", min_agreement, low=0, high=1)


def export(source: str | Path, formats: str = "onnx", out: str | Path | None = None, data_dir: str | None = None,
           precision: str = "fp16", opset: int = 17, onnx_fp16: bool = False, simplify: bool = False,
           min_batch: int = 1, opt_batch: int = 32, max_batch: int = 256, workspace_gib: float = 4.0,
           triton_repo: str | Path | None = None, verify_batch: int = 256, min_agreement: float = 0.99) -> dict:
    names = parse_formats(formats)
    if not names:
        raise CompressorError("no export format given; use --export onnx,trt,aoti")
    check_options(precision, opset, min_batch, opt_batch, max_batch, workspace_gib, verify_batch, min_agreement)
    if "trt" in names:
        from . import tensorrt

        tensorrt.require()  # stop before any work when TensorRT or a GPU is missing
    ckpt, run_dir = _source(Path(source))
    out = Path(out) if out else (run_dir / "export" if run_dir else ckpt.parent / f"{ckpt.stem}-export")
    model, spec = checkpoint.load(ckpt, with_spec=True)
    data = datasets.load(spec.dataset, data_dir, val_fraction=0.0)
    x, _ = next(iter(DeviceBatches(data, "test", verify_batch, "cpu")))
    with torch.no_grad():
        reference = model(x)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{spec.model}-{ckpt.stem}")
    results: dict = {"source": str(ckpt), "source_sha256": sha256(ckpt), "verify_images": int(x.shape[0])}

    def checked(fmt, path, run):
        try:
            results[fmt] = {"path": str(path), "verification": verify(reference, run(), min_agreement, f"{fmt} ({path.name})")}
        except Exception:
            path.unlink(missing_ok=True)
            raise

    onnx_path = None
    if "onnx" in names or "trt" in names:
        from . import onnx

        onnx_path = onnx.export(model, out / f"{stem}.onnx", x, opset=opset, fp16=onnx_fp16, simplify=simplify)
        checked("onnx", onnx_path, lambda: onnx.OnnxRuntimeModel(onnx_path, "cpu")(x))
        results["onnx"] |= {"opset": opset, "fp16": onnx_fp16, "simplified": simplify,
                            "input": onnx.INPUT, "output": onnx.OUTPUT, "exporter": onnx.exporter_of(onnx_path)}
    if "aoti" in names:
        from . import aoti

        device = "cuda" if torch.cuda.is_available() else "cpu"
        path = aoti.export(model, out / f"{stem}-{device}.pt2", x, device, max_batch=max_batch)
        checked("aoti", path, lambda: aoti.AOTIModel(path)(x.to(device)))
        results["aoti"]["device"] = device
    if "trt" in names:
        from . import onnx, tensorrt

        calibration = None
        if precision == "int8":
            calibration = [b for b, _ in DeviceBatches(data, "train", opt_batch, "cuda")][:16]
        if tensorrt.wants_fp16_onnx(precision):
            onnx_path = onnx.export(model, out / f"{stem}-fp16.onnx", x, opset=opset, fp16=True)
        engine = tensorrt.build_engine(onnx_path, out / f"{stem}-{precision}.engine", precision=precision,
                                       min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                       workspace_gib=workspace_gib, timing_cache=out / "timing.cache",
                                       calibration_batches=calibration,
                                       calibration_cache=out / f"{stem}-int8.calib",
                                       source_sha256=results["source_sha256"])
        checked("trt", engine, lambda: tensorrt.TensorRTModel(engine)(x[: max_batch].cuda()))
        results["trt"]["precision"] = precision
    if triton_repo:
        from . import triton

        for fmt in ("onnx", "trt"):
            if fmt in names:
                folder = triton.write_repository(triton_repo, f"{stem}-{fmt}", results[fmt]["path"], fmt, "input",
                                                 "logits", spec.input_shape, spec.num_classes, max_batch)
                results[fmt]["triton"] = str(folder)
    write_json(out / "export.json", results)
    if run_dir and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["export"] = results
        write_json(run_dir / "metrics.json", metrics)
    return results
