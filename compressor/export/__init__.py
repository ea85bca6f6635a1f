"""Export backends: ONNX (checked with ONNX Runtime), int8 ONNX (ONNX Runtime static quantization,
QDQ), TensorRT engines, AOTInductor packages.

Every backend builds an artifact from a model, loads it back as a callable on torch
tensors, and is checked against PyTorch on real inputs with :func:`verify`. Backends are
imported lazily, so a missing optional runtime only matters when it is asked for.

Each format ``compress export`` knows is one entry of :data:`FORMATS`, registered beside the
step that builds it (:mod:`compressor.export.formats`); :func:`compressor.export.run.export`,
:func:`parse_formats` and the CLI's help read names and settings from there. An entry's
``info``: ``help`` (one line), ``order`` (build order: a format is built after those it is made
from), ``needs`` (the formats it is built from: a tuple, or a function of the export options
returning one), ``check`` (a function of the options that refuses a bad combination before any
work), ``tensorrt`` (True: needs TensorRT and a CUDA GPU, checked before any work) and
``triton`` (the Triton backend kind for ``--triton-repo``, "onnx" or "trt"; absent: none).
The step itself is called with a :class:`compressor.export.run.Job`; its ``options`` (and the
``options`` that ``needs`` and ``check`` are given) are an :class:`ExportConfig`
(:mod:`compressor.export.config`), the settings declared once for the CLI and the API.
"""
from __future__ import annotations

import torch

from ..errors import CompressorError
from ..registry import Registry
from ..selftest import cpu_features

FORMATS = Registry("export format")


def parse_formats(text: str | None) -> list[str]:
    names = [f.strip() for f in (text or "").split(",") if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown:
        raise CompressorError(f"unknown export format(s) {', '.join(unknown)}; "
                              f"choose from {', '.join(FORMATS.names())}")
    return names


def build_order(names: list[str], options) -> list[str]:
    """``names`` and every format they are built from (``info["needs"]``), in build order (``info["order"]``)."""
    wanted: list[str] = []
    pending = list(names)
    while pending:
        name = pending.pop(0)
        if name in wanted:
            continue
        wanted.append(name)
        needs = FORMATS.get(name).info.get("needs", ())
        pending += list(needs(options) if callable(needs) else needs)
    return sorted(wanted, key=lambda n: (FORMATS.get(n).info.get("order", 1000), n))


def require(names: list[str], options=None) -> None:
    """Stop before any work when a format cannot be built here: TensorRT or a GPU missing for a
    format that needs them (``info["tensorrt"]``), then each format's own ``info["check"]``
    of ``options`` (when given)."""
    for name in names:
        info = FORMATS.get(name).info
        if info.get("tensorrt"):
            from . import tensorrt

            tensorrt.require()
        if options is not None and info.get("check"):
            info["check"](options)


# int8 logits may differ from PyTorch's by this share of the largest logit: quantization costs a few
# percent; kernels that saturate cost tens of percent before they flip an answer
INT8_MAX_RELATIVE_DIFF = 0.15


@torch.no_grad()
def verify(reference: torch.Tensor, candidate: torch.Tensor, min_agreement: float = 0.99, what: str = "export",
           max_relative_diff: float | None = None) -> dict:
    """Compare an exported model's logits with PyTorch's on the same batch.

    Disagreement on top-1 above the tolerance is an error, not a warning: an artifact
    that answers differently is not the model that was pruned and measured. With
    ``max_relative_diff``, logits further than that share of PyTorch's largest |logit| are an
    error too: int8 kernels that saturate shift every logit before they flip an answer.
    """
    reference, candidate = reference.float().cpu(), candidate.float().cpu()
    if reference.shape != candidate.shape:
        raise CompressorError(f"{what}: output shape {tuple(candidate.shape)} "
                              f"differs from PyTorch's {tuple(reference.shape)}")
    result = {
        "max_abs_diff": float((reference - candidate).abs().max()),
        "max_relative_diff": float((reference - candidate).abs().max() / reference.abs().max().clamp_min(1e-6)),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).float().mean()),
        "batch": int(reference.shape[0]),
    }
    print(f"{what}: max |diff| {result['max_abs_diff']:.3g} ({result['max_relative_diff']:.1%} of the largest "
          f"logit), top-1 agreement {result['top1_agreement']:.2%} on {result['batch']} images")
    if result["top1_agreement"] < min_agreement:
        raise CompressorError(
            f"{what} disagrees with PyTorch on {1 - result['top1_agreement']:.1%} of top-1 answers "
            f"(tolerance {1 - min_agreement:.1%}); the artifact is not trustworthy"
        )
    if max_relative_diff is not None and result["max_relative_diff"] > max_relative_diff:
        raise CompressorError(
            f"{what}'s logits are off PyTorch's by up to {result['max_relative_diff']:.1%} of the largest logit "
            f"(tolerance {max_relative_diff:.0%}), though top-1 agrees on {result['top1_agreement']:.1%}; the "
            f"artifact is not trustworthy on this CPU ({cpu_features()}). int8 kernels for signed weights "
            "saturate on x86 CPUs without VNNI: use --int8-scheme s8s8-reduced (the default) or u8u8"
        )
    return result


from . import formats  # noqa: E402,F401  (last on purpose: registers the built-in formats in FORMATS)
from .config import ExportConfig  # noqa: E402,F401
