"""``compress export``: turn a run's pruned checkpoint into deployable artifacts, each verified.

An artifact that fails verification is deleted, so whatever is left on disk answered
like the PyTorch model on a real batch of the model's own test images. Each artifact that
is kept is then scored on the whole test split (top-1 accuracy, beside PyTorch's), unless
``accuracy=False`` (``--no-accuracy``).
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
from ..runtime import write_metadata
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
                  min_agreement: float = 0.99, calibration_images: int = 512, calibration_method: str = "minmax",
                  int8_min_agreement: float = 0.95, trt_int8: str = "qdq") -> None:
    """Refuse a bad export number (NaN and inf too) with one clear error, before anything is loaded.

    ``compress run --export`` calls this before training, ``export`` before reading its checkpoint.
    """
    from . import quantize
    from .onnx import check_opset
    from .tensorrt import INT8_SOURCES, PRECISIONS

    choice("--trt-precision", precision, PRECISIONS)
    check_opset(opset)
    for flag, value in (("--min-batch", min_batch), ("--opt-batch", opt_batch), ("--max-batch", max_batch),
                        ("verify_batch", verify_batch)):
        number(flag, value, integer=True, low=1)
    if not min_batch <= opt_batch <= max_batch:
        raise CompressorError(f"need 1 <= min batch <= opt batch <= max batch, got {min_batch}, {opt_batch}, {max_batch}")
    number("--workspace-gib", workspace_gib, low=0, low_open=True)
    number("min_agreement", min_agreement, low=0, high=1)
    quantize.check_options(calibration_images, calibration_method)
    number("int8_min_agreement", int8_min_agreement, low=0, high=1)
    choice("--trt-int8", trt_int8, INT8_SOURCES)


def _on(device, runner):
    """``runner`` called on CPU tensors moved to ``device`` first."""
    return lambda x: runner(x.to(device))


@torch.no_grad()
def split_accuracy(run, data, batch: int = 256) -> float:
    """Top-1 accuracy of ``run`` (CPU float NCHW tensor -> logits) on the whole test split of ``data``, in batches."""
    correct = 0
    for x, y in DeviceBatches(data, "test", batch, "cpu"):
        correct += int((run(x).argmax(1).cpu() == y).sum())
    return correct / max(1, len(data.test_y))


def export(source: str | Path, formats: str = "onnx", out: str | Path | None = None, data_dir: str | None = None,
           precision: str = "fp16", opset: int = 17, onnx_fp16: bool = False, simplify: bool = False,
           min_batch: int = 1, opt_batch: int = 32, max_batch: int = 256, workspace_gib: float = 4.0,
           triton_repo: str | Path | None = None, verify_batch: int = 256, min_agreement: float = 0.99,
           accuracy: bool = True, calibration_images: int = 512, calibration_method: str = "minmax",
           calibration_seed: int = 0, int8_min_agreement: float = 0.95, trt_int8: str = "qdq") -> dict:
    """Export ``source`` (a run directory or a checkpoint) to ``formats``; returns what export.json holds.

    ``onnx-int8`` is the fp32 ONNX statically quantized by ONNX Runtime (QDQ, per-channel int8
    weights), calibrated on ``calibration_images`` training images drawn with ``calibration_seed``;
    it must agree with PyTorch on ``int8_min_agreement`` of the top-1 answers (fp32 artifacts:
    ``min_agreement``). An int8 TensorRT engine is built from that Q/DQ file (``trt_int8="qdq"``)
    or, on TensorRT 10 only, from the fp32 ONNX with the implicit calibrator (``"calibrator"``).
    With ``accuracy``, every artifact's top-1 accuracy on the whole test split is measured and
    stored beside the PyTorch model's.
    """
    names = parse_formats(formats)
    if not names:
        raise CompressorError("no export format given; use --export onnx,onnx-int8,trt,aoti")
    check_options(precision, opset, min_batch, opt_batch, max_batch, workspace_gib, verify_batch, min_agreement,
                  calibration_images, calibration_method, int8_min_agreement, trt_int8)
    int8_qdq = "onnx-int8" in names or ("trt" in names and precision == "int8" and trt_int8 == "qdq")
    if int8_qdq and onnx_fp16:
        raise CompressorError("int8 ONNX is quantized from an fp32 ONNX: drop --onnx-fp16, or export the fp16 "
                              "ONNX in a separate `compress export`")
    if "trt" in names:
        from . import tensorrt

        trt = tensorrt.require()  # stop before any work when TensorRT or a GPU is missing
        if precision == "int8":
            tensorrt.plan_int8(tensorrt.major_version(trt), trt_int8)  # TensorRT 11+ has no calibrator
    ckpt, run_dir = _source(Path(source))
    out = Path(out) if out else (run_dir / "export" if run_dir else ckpt.parent / f"{ckpt.stem}-export")
    model, spec = checkpoint.load(ckpt, with_spec=True)
    data = datasets.load(spec.dataset, data_dir, val_fraction=0.0)
    x, _ = next(iter(DeviceBatches(data, "test", verify_batch, "cpu")))
    with torch.no_grad():
        reference = model(x)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{spec.model}-{ckpt.stem}")
    results: dict = {"source": str(ckpt), "source_sha256": sha256(ckpt), "verify_images": int(x.shape[0])}
    batch = min(max_batch, 256)  # accuracy batches: within the TensorRT / AOTI profile
    if accuracy:
        results["accuracy"] = {"split": "test", "images": len(data.test_y), "batch": batch,
                               "pytorch": split_accuracy(model, data, batch)}
        print(f"PyTorch: test accuracy {results['accuracy']['pytorch']:.2%} on {len(data.test_y)} images")

    def checked(fmt, path, load, tolerance=min_agreement, limit=None):
        """Verify the artifact at ``path`` (deleted if it fails), then score it on the test split."""
        try:
            run = load()  # float CPU tensor in, logits out
            rows = slice(None, limit)
            results[fmt] = {"path": str(path), "min_agreement": tolerance,
                            "verification": verify(reference[rows], run(x[rows]), tolerance, f"{fmt} ({path.name})")}
        except Exception:
            path.unlink(missing_ok=True)
            raise
        if accuracy:
            score = split_accuracy(run, data, batch)
            change = 100 * (score - results["accuracy"]["pytorch"]) + 0.0  # + 0.0: no "-0.00"
            results[fmt] |= {"accuracy": score, "accuracy_drop_points": round(-change, 4) + 0.0}
            print(f"{fmt} ({path.name}): test accuracy {score:.2%} ({change:+.2f} points vs PyTorch)")

    onnx_path = int8_path = None
    if "onnx" in names or "trt" in names or int8_qdq:
        from . import onnx

        onnx_path = onnx.export(model, out / f"{stem}.onnx", x, opset=opset, fp16=onnx_fp16, simplify=simplify)
        write_metadata(onnx_path, spec, max_batch)  # the spec in metadata_props, for compressor.runtime.load
        checked("onnx", onnx_path, lambda: onnx.OnnxRuntimeModel(onnx_path, "cpu"))
        results["onnx"] |= {"opset": opset, "fp16": onnx_fp16, "simplified": simplify,
                            "input": onnx.INPUT, "output": onnx.OUTPUT, "exporter": onnx.exporter_of(onnx_path)}
    if int8_qdq:
        from . import onnx, quantize

        for_trt = "trt" in names and precision == "int8"  # TensorRT: zero points of 0, no int32 bias Q/DQ
        images = quantize.calibration_images(data, calibration_images, calibration_seed)
        int8_path = quantize.quantize(onnx_path, out / f"{stem}-int8.onnx", images, calibration_method,
                                      tensorrt=for_trt)
        checked("onnx-int8", int8_path, lambda: onnx.OnnxRuntimeModel(int8_path, "cpu"), int8_min_agreement)
        graph = quantize.describe(int8_path)
        results["onnx-int8"] |= {
            "from": onnx_path.name, "format": "QDQ", "weights": "int8, per-channel, symmetric",
            "activations": f"int8, {'symmetric' if for_trt else 'asymmetric'}",
            "biases": "float" if for_trt else "int32",
            "calibration": {"method": calibration_method, "images": int(images.shape[0]), "split": "train",
                            "seed": calibration_seed},
            "quantize_linear": graph["quantize_linear"], "dequantize_linear": graph["dequantize_linear"],
            "per_channel_weights": len(graph["per_channel_weights"]),
        }
    if "aoti" in names:
        from . import aoti

        device = "cuda" if torch.cuda.is_available() else "cpu"
        path = aoti.export(model, out / f"{stem}-{device}.pt2", x, device, max_batch=max_batch)
        write_metadata(path, spec, max_batch)  # the spec in the sidecar path.json, for compressor.runtime.load
        checked("aoti", path, lambda: _on(device, aoti.AOTIModel(path)), limit=max_batch)
        results["aoti"]["device"] = device
    if "trt" in names:
        from . import onnx, tensorrt

        calibration = None
        if precision == "int8" and trt_int8 == "calibrator":  # TensorRT 10's implicit, deprecated path
            calibration = [b for b, _ in DeviceBatches(data, "train", opt_batch, "cuda")][:16]
        if precision == "int8" and trt_int8 == "qdq":
            onnx_path = int8_path  # explicit quantization: the scales are in the verified Q/DQ file
        if tensorrt.wants_fp16_onnx(precision):
            onnx_path = onnx.export(model, out / f"{stem}-fp16.onnx", x, opset=opset, fp16=True)
        engine = tensorrt.build_engine(onnx_path, out / f"{stem}-{precision}.engine", precision=precision,
                                       min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                                       workspace_gib=workspace_gib, timing_cache=out / "timing.cache",
                                       calibration_batches=calibration,
                                       calibration_cache=out / f"{stem}-int8.calib",
                                       source_sha256=results["source_sha256"])
        write_metadata(engine, spec, max_batch)  # the spec in the engine's sidecar, for compressor.runtime.load
        checked("trt", engine, lambda: _on("cuda", tensorrt.TensorRTModel(engine)),
                int8_min_agreement if precision == "int8" else min_agreement, limit=max_batch)
        results["trt"] |= {"precision": precision, "onnx": Path(onnx_path).name}
        if precision == "int8":
            results["trt"]["int8"] = trt_int8
    if triton_repo:
        from . import triton

        for fmt in ("onnx", "onnx-int8", "trt"):
            if fmt in names:
                folder = triton.write_repository(triton_repo, f"{stem}-{fmt}", results[fmt]["path"],
                                                 "trt" if fmt == "trt" else "onnx", "input",
                                                 "logits", spec.input_shape, spec.num_classes, max_batch)
                results[fmt]["triton"] = str(folder)
    write_json(out / "export.json", results)
    if run_dir and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["export"] = results
        write_json(run_dir / "metrics.json", metrics)
    return results
