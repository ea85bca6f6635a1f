"""``compress export``: turn a run's pruned checkpoint into deployable artifacts, each verified.

An artifact that fails verification is deleted, so whatever is left on disk answered
like the PyTorch model on a real batch of the model's own test images. Each artifact that
is kept is then scored on the whole test split (top-1 accuracy, beside PyTorch's), unless
``accuracy=False`` (``--no-accuracy``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .. import checkpoint, selftest
from .. import data as datasets
from ..artifacts import sha256, write_self_test
from ..data import DeviceBatches
from ..errors import CompressorError
from ..files import write_json
from ..rundir import RunDir, make_dir
from . import FORMATS, build_order, parse_formats, require, verify
from .config import ExportConfig

EXPORT_JSON = RunDir("").export_json.name  # what an export folder holds beside its artifacts


def _source(path: Path) -> tuple[Path, RunDir | None]:
    """(checkpoint, run directory or None) for a run directory or a checkpoint file."""
    if path.is_dir():
        run = RunDir.holding(path)
        if run is None:
            raise CompressorError(f"{path} has no {RunDir(path).pruned.name}; give a finished run directory or a "
                                  "checkpoint file")
        return run.pruned, run
    if not path.is_file():
        raise CompressorError(f"no run directory or checkpoint at {path}")
    return path, None


@torch.no_grad()
def split_accuracy(run, data, batch: int = 256) -> float:
    """Top-1 accuracy of ``run`` (CPU float NCHW tensor -> logits) on the whole test split of ``data``, in batches."""
    correct = 0
    for x, y in DeviceBatches(data, "test", batch, "cpu"):
        correct += int((run(x).argmax(1).cpu() == y).sum())
    return correct / max(1, len(data.test_y))


@dataclass
class Job:
    """One export, as each format's step sees it (see :mod:`compressor.export.formats`)."""
    model: nn.Module  # the pruned model, float32 on the CPU
    spec: object  # its checkpoint.ModelSpec
    data: object  # the data set (test split: verification and accuracy; train split: calibration)
    x: torch.Tensor  # the verification batch
    reference: torch.Tensor  # PyTorch's logits on it
    out: Path  # the folder the artifacts go to
    stem: str  # "<model>-<checkpoint stem>": the start of every artifact's file name
    names: list[str]  # the formats asked for (not those built only because others are made from them)
    options: ExportConfig
    results: dict  # what export.json will hold; each format fills results[name]
    accuracy: bool = True  # score every kept artifact on the whole test split
    batch: int = 256  # of those accuracy batches
    artifacts: dict[str, Path] = field(default_factory=dict)  # format -> its file, for the formats built from it

    def check(self, fmt: str, path: Path, load: Callable[[], Callable], tolerance: float | None = None,
              limit: int | None = None, max_relative_diff: float | None = None) -> None:
        """Verify the artifact at ``path`` (deleted if it fails), then score it on the test split.

        ``load()`` gives a callable from a float CPU tensor to logits; ``tolerance`` is the least
        top-1 agreement (default ``options.min_agreement``), ``limit`` the most rows of the
        verification batch the artifact takes at once, ``max_relative_diff`` the most its logits may
        differ from PyTorch's, as a share of the largest one (int8: :data:`compressor.export.INT8_MAX_RELATIVE_DIFF`).
        """
        tolerance = self.options.min_agreement if tolerance is None else tolerance
        try:
            run = load()  # float CPU tensor in, logits out
            rows = slice(None, limit)
            got = run(self.x[rows])
            self.results[fmt] = {"path": str(path), "min_agreement": tolerance,
                                 "verification": verify(self.reference[rows], got, tolerance, f"{fmt} ({path.name})",
                                                        max_relative_diff)}
            # the clearest of those answers travel with the artifact: runtime.load re-runs them where it is served
            record = selftest.make(self.x[rows], self.reference[rows], got, tolerance, fmt)
            if record is not None:
                write_self_test(path, record)
                self.results[fmt]["self_test"] = {"images": record["count"], "exported_on": record["exported_on"]}
        except Exception:
            path.unlink(missing_ok=True)
            raise
        if self.accuracy:
            score = split_accuracy(run, self.data, self.batch)
            change = 100 * (score - self.results["accuracy"]["pytorch"]) + 0.0  # + 0.0: no "-0.00"
            self.results[fmt] |= {"accuracy": score, "accuracy_drop_points": round(-change, 4) + 0.0}
            print(f"{fmt} ({path.name}): test accuracy {score:.2%} ({change:+.2f} points vs PyTorch)")


def export(source: str | Path, formats: str = "onnx", out: str | Path | None = None, data_dir: str | None = None,
           config: ExportConfig | None = None, trusted_factories=(), **overrides) -> dict:
    """Export ``source`` (a run directory or a checkpoint) to ``formats``; returns what export.json holds.

    The settings are ``config`` (:class:`ExportConfig`, default its defaults) with any of its fields
    given as keywords on top (``export(run, "onnx", opset=18)``), checked before anything is read.
    ``onnx-int8`` is the fp32 ONNX statically quantized by ONNX Runtime (QDQ, per-channel int8
    weights), calibrated on ``calibration_images`` training images drawn with ``calibration_seed``;
    it must agree with PyTorch on ``int8_min_agreement`` of the top-1 answers (fp32 artifacts:
    ``min_agreement``). An int8 TensorRT engine is built from that Q/DQ file (``trt_int8="qdq"``)
    or, on TensorRT 10 only, from the fp32 ONNX with the implicit calibrator (``"calibrator"``).
    With ``accuracy``, every artifact's top-1 accuracy on the whole test split is measured and
    stored beside the PyTorch model's. ``int8_scheme``: the 8-bit types of ``onnx-int8``
    (:data:`compressor.export.quantize.SCHEMES`; the default answers alike on every x86 CPU).
    ``trusted_factories``: model factories the checkpoint may name beyond the registry and torchvision.
    Every artifact records a self-test (:mod:`compressor.selftest`) that ``runtime.load`` re-runs.
    """
    options = ExportConfig.given(config, **overrides)  # every number checked, before any file is read
    names = parse_formats(formats)
    if not names:
        raise CompressorError(f"no export format given; use --export {','.join(FORMATS.names())}")
    plan = build_order(names, options)  # what was asked for, and what it is built from
    require(plan, options)  # stop before any work when TensorRT or a GPU is missing, or options clash
    ckpt, run_dir = _source(Path(source))
    out = Path(out) if out else (run_dir.export_dir if run_dir else ckpt.parent / f"{ckpt.stem}-export")
    make_dir(out)
    model, spec = checkpoint.load(ckpt, with_spec=True, trusted_factories=trusted_factories)
    data = datasets.load(spec.dataset, data_dir, val_fraction=0.0)
    x, _ = next(iter(DeviceBatches(data, "test", options.verify_batch, "cpu")))
    with torch.no_grad():
        reference = model(x)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{spec.model}-{ckpt.stem}")
    results: dict = {"source": str(ckpt), "source_sha256": sha256(ckpt), "verify_images": int(x.shape[0])}
    batch = min(options.max_batch, 256)  # accuracy batches: within the TensorRT / AOTI profile
    if options.accuracy:
        results["accuracy"] = {"split": "test", "images": len(data.test_y), "batch": batch,
                               "pytorch": split_accuracy(model, data, batch)}
        print(f"PyTorch: test accuracy {results['accuracy']['pytorch']:.2%} on {len(data.test_y)} images")
    job = Job(model, spec, data, x, reference, out, stem, names, options, results, options.accuracy, batch)
    for fmt in plan:
        FORMATS.get(fmt).target(job)
    if options.triton_repo:
        from . import triton

        for fmt in plan:
            kind = FORMATS.get(fmt).info.get("triton")
            if fmt in names and kind:
                folder = triton.write_repository(options.triton_repo, f"{stem}-{fmt}", results[fmt]["path"], kind,
                                                 "input", "logits", spec.input_shape, spec.num_classes,
                                                 options.max_batch)
                results[fmt]["triton"] = str(folder)
    write_json(out / EXPORT_JSON, results)
    if run_dir:
        run_dir.update_metrics("export", results)  # a finished run's metrics.json gets the results too
    return results
