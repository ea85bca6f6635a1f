"""The export settings, declared once: the CLI's "export" options, what :func:`compressor.export.run.export`
takes and what each format's step reads (``job.options``)."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import Settings, option
from .quantize import DEFAULT_IMAGES, DEFAULT_METHOD, DEFAULT_SCHEME, METHODS, MIN_AGREEMENT, SCHEMES
from .tensorrt import INT8_SOURCES, PRECISIONS


@dataclass(frozen=True)
class ExportConfig(Settings):
    """How ``compress export`` builds, checks and scores its artifacts; checked when built."""

    precision: str = option("fp16", "TensorRT engine precision (int8: see --trt-int8)", flag="--trt-precision",
                            choices=PRECISIONS)
    trt_int8: str = option("qdq", "int8 engine from the onnx-int8 Q/DQ file (explicit, default), or from the fp32 "
                           "ONNX with TensorRT's implicit calibrator (TensorRT 10 only, deprecated there)",
                           flag="--trt-int8", choices=INT8_SOURCES)
    calibration_images: int = option(DEFAULT_IMAGES, "onnx-int8: training images (fixed seed) that calibrate "
                                     "activation ranges (default 512)", flag="--calibration-images", integer=True,
                                     low=1, metavar="N", parse_check=True)
    calibration_method: str = option(DEFAULT_METHOD, "onnx-int8: ONNX Runtime calibration method (default minmax)",
                                     flag="--calibration-method", choices=METHODS)
    int8_scheme: str = option(DEFAULT_SCHEME, "onnx-int8: 8-bit types. s8s8-reduced (default): int8 with 7-bit "
                              "weights, which cannot saturate ONNX Runtime's kernels on x86 CPUs without VNNI and "
                              "runs at s8s8's speed; u8u8: uint8 both, also portable, slower where VNNI is; s8s8: "
                              "full int8 weights, saturates on x86 CPUs without VNNI (a trt int8 engine always uses "
                              "s8s8)", flag="--int8-scheme",
                              choices=(DEFAULT_SCHEME, *(k for k in SCHEMES if k != DEFAULT_SCHEME)))
    accuracy: bool = option(True, "skip each artifact's top-1 accuracy on the whole test split (measured by "
                            "default)", flag="--no-accuracy", dest="accuracy")
    opset: int = option(17, "ONNX opset (>= 17)", flag="--opset", integer=True)
    onnx_fp16: bool = option(False, "convert the ONNX file to fp16 (needs onnxconverter-common)", flag="--onnx-fp16")
    simplify: bool = option(False, "simplify the ONNX graph with onnxslim", flag="--onnx-simplify")
    min_batch: int = option(1, "TensorRT profile: smallest batch", flag="--min-batch", integer=True, low=1)
    opt_batch: int = option(32, "TensorRT profile: batch to tune for", flag="--opt-batch", integer=True, low=1)
    max_batch: int = option(256, "TensorRT profile / Triton: largest batch", flag="--max-batch", integer=True, low=1)
    workspace_gib: float = option(4.0, "TensorRT builder workspace limit", flag="--workspace-gib", low=0,
                                  low_open=True)
    triton_repo: str | None = option(None, "also write a Triton model repository here (onnx and trt artifacts)",
                                     flag="--triton-repo")
    # API only
    verify_batch: int = option(256, "test images every artifact is verified on", flag="verify_batch", integer=True,
                               low=1, cli=False)
    min_agreement: float = option(0.99, "least top-1 agreement with PyTorch of an fp32 or fp16 artifact",
                                  flag="min_agreement", low=0, high=1, cli=False)
    int8_min_agreement: float = option(MIN_AGREEMENT, "least top-1 agreement with PyTorch of an int8 artifact",
                                       flag="int8_min_agreement", low=0, high=1, cli=False)
    calibration_seed: int = option(0, "onnx-int8: the seed that draws the calibration images",
                                   flag="calibration_seed", integer=True, cli=False)

    def check(self) -> None:
        from .onnx import check_opset
        from .tensorrt import check_profile

        check_opset(self.opset)
        check_profile(self.min_batch, self.opt_batch, self.max_batch)
