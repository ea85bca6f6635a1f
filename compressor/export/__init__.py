"""Export backends: ONNX (checked with ONNX Runtime), int8 ONNX (ONNX Runtime static quantization,
QDQ), TensorRT engines, AOTInductor packages.

Every backend builds an artifact from a model, loads it back as a callable on torch
tensors, and is checked against PyTorch on real inputs with :func:`verify`. Backends are
imported lazily, so a missing optional runtime only matters when it is asked for.
"""
from __future__ import annotations

import torch

from ..errors import CompressorError

FORMATS = ("onnx", "onnx-int8", "trt", "aoti")


def parse_formats(text: str | None) -> list[str]:
    names = [f.strip() for f in (text or "").split(",") if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown:
        raise CompressorError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    return names


@torch.no_grad()
def verify(reference: torch.Tensor, candidate: torch.Tensor, min_agreement: float = 0.99, what: str = "export") -> dict:
    """Compare an exported model's logits with PyTorch's on the same batch.

    Disagreement on top-1 above the tolerance is an error, not a warning: an artifact
    that answers differently is not the model that was pruned and measured.
    """
    reference, candidate = reference.float().cpu(), candidate.float().cpu()
    if reference.shape != candidate.shape:
        raise CompressorError(f"{what}: output shape {tuple(candidate.shape)} differs from PyTorch's {tuple(reference.shape)}")
    result = {
        "max_abs_diff": float((reference - candidate).abs().max()),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).float().mean()),
        "batch": int(reference.shape[0]),
    }
    print(f"{what}: max |diff| {result['max_abs_diff']:.3g}, top-1 agreement {result['top1_agreement']:.2%} "
          f"on {result['batch']} images")
    if result["top1_agreement"] < min_agreement:
        raise CompressorError(
            f"{what} disagrees with PyTorch on {1 - result['top1_agreement']:.1%} of top-1 answers "
            f"(tolerance {1 - min_agreement:.1%}); the artifact is not trustworthy"
        )
    return result
