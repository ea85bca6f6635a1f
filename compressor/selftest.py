"""An artifact's self-test: a few inputs and the answers it gave where it was exported.

The same int8 ONNX file answers differently on different CPUs: ONNX Runtime's x86 kernels for
signed int8 weights can saturate their 16-bit sums on CPUs without VNNI, and an export checked
on a VNNI machine says nothing about an AVX2 server. So every exported artifact carries the
inputs it was verified on (the most clear-cut of them) with PyTorch's top-1 and the artifact's
own logits there, and :func:`compressor.runtime.load` runs them on the serving machine, refusing
an artifact that no longer agrees (``--skip-self-test`` / ``self_test=False`` turn that off).

The record is JSON: in an ONNX file's ``metadata_props`` under :data:`KEY`, beside a ``.pt2``
package or a TensorRT engine in its sidecar under ``self_test``. It is data read from a file,
so every field is checked before use, and nothing in it chooses code.
"""
from __future__ import annotations

import base64
import math
import platform
from functools import lru_cache

import numpy as np
import torch

from .artifacts import SELF_TEST_KEY
from .errors import CompressorError

KEY = SELF_TEST_KEY  # ONNX metadata_props key; sidecars use "self_test"
FORMAT = "compressor.self-test/1"
MAX_IMAGES = 16  # inputs kept: enough that one flipped answer shows, few enough to run at every load
MAX_BYTES = 2 << 20  # the inputs' size in the record (base64 adds a third)
MAX_RELATIVE_DIFF = 0.05  # |logits here - logits at export| / max |logit at export| an artifact may drift


@lru_cache(maxsize=1)
def cpu_features() -> str:
    """This CPU in one line, with the features that decide int8 kernels (AVX2, AVX-512, VNNI, ARM dot product).

    The features are what the CPUID instruction says (through NumPy's dispatcher), as ONNX Runtime sees
    them, not /proc/cpuinfo's flags, which an emulator or a VM's CPU model can contradict.
    """
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as found
    wanted = ("AVX2", "AVX512F", "AVX512VNNI", "AVX512_SPR", "ASIMDDP", "ASIMDFHM", "SVE")
    have = [f for f in wanted if found.get(f)]
    return (f"{name or platform.processor() or 'unknown CPU'} ({platform.machine()}; "
            f"{', '.join(have) if have else 'no AVX2, VNNI or dot product'})")


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().float().cpu().contiguous().numpy().astype("<f4").tobytes()).decode("ascii")


def _decode(text, shape: list[int], where: str) -> torch.Tensor:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise CompressorError(f"{where}: the self-test's data is not base64") from None
    if len(raw) != 4 * math.prod(shape):
        raise CompressorError(f"{where}: the self-test's data does not have shape {shape}")
    values = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)
    if not np.isfinite(values).all():
        raise CompressorError(f"{where}: the self-test's data holds NaN or inf")
    return torch.from_numpy(values.copy())


def make(inputs: torch.Tensor, reference: torch.Tensor, got: torch.Tensor, min_agreement: float,
         kind: str = "") -> dict | None:
    """The record for an artifact that answered ``got`` where PyTorch answered ``reference`` on ``inputs``.

    Keeps the rows where both agree, those PyTorch is surest of first, so that a flip on the
    serving machine is a change of the artifact's behaviour, not a borderline image.
    """
    reference, got, inputs = reference.float().cpu(), got.float().cpu(), inputs.float().cpu()
    top1 = reference.argmax(1)
    agree = (got.argmax(1) == top1).nonzero().flatten()
    if len(agree) == 0:
        return None
    top2 = reference.topk(min(2, reference.shape[1]), dim=1).values
    margin = (top2[:, 0] - top2[:, -1])[agree]
    per_image = 4 * math.prod(inputs.shape[1:])
    keep = agree[margin.argsort(descending=True)][: max(1, min(MAX_IMAGES, MAX_BYTES // per_image))]
    keep = keep.sort().values
    return {"format": FORMAT, "input_shape": list(inputs.shape[1:]), "count": len(keep),
            "inputs": _encode(inputs[keep]), "top1": top1[keep].tolist(), "logits": _encode(got[keep]),
            "classes": int(got.shape[1]), "min_agreement": float(min_agreement),
            "max_relative_diff": MAX_RELATIVE_DIFF, "kind": kind, "exported_on": cpu_features()}


def check(record, where: str) -> dict:
    """The record, if it is one (every field's type and size); else one clear error."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CompressorError(f"{where}: its self-test record is not a {FORMAT} record; re-export it, or load it "
                              "with --skip-self-test")
    shape, count, classes = record.get("input_shape"), record.get("count"), record.get("classes")

    def whole(x, high):
        return isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= high

    ok = (isinstance(shape, list) and len(shape) == 3 and all(whole(d, 1 << 16) for d in shape)
          and whole(count, MAX_IMAGES) and whole(classes, 1 << 20) and count * 4 * math.prod(shape) <= MAX_BYTES
          and isinstance(record.get("top1"), list) and len(record["top1"]) == count
          and all(whole(c + 1, classes) for c in record["top1"] if isinstance(c, int))
          and all(isinstance(c, int) and not isinstance(c, bool) for c in record["top1"])
          and all(isinstance(record.get(k), (int, float)) and not isinstance(record.get(k), bool)
                  and 0 <= record[k] <= 1 for k in ("min_agreement", "max_relative_diff"))
          and isinstance(record.get("inputs"), str) and isinstance(record.get("logits"), str))
    if not ok:
        raise CompressorError(f"{where}: its self-test record is malformed; re-export it, or load it with "
                              "--skip-self-test")
    return record


def run(model, record) -> dict | None:
    """Run ``record``'s inputs through the loaded ``model`` (a :class:`compressor.runtime.Runtime`); refuse
    it with one message naming this CPU when it no longer answers as it did at export."""
    if record is None:
        return None
    where = model.path.name
    record = check(record, where)
    count, shape = record["count"], record["input_shape"]
    x = _decode(record["inputs"], [count, *shape], where)
    expected = _decode(record["logits"], [count, record["classes"]], where)
    if model.input_shape and tuple(shape) != tuple(model.input_shape):
        raise CompressorError(f"{where}: its self-test is for input {shape}, the artifact takes "
                              f"{list(model.input_shape)}; re-export it")
    rows = range(0, count, max(1, model.max_batch))
    low = max(1, model.min_batch)
    outs = []
    for start in rows:
        batch = x[start:start + model.max_batch]
        pad = max(0, low - len(batch))  # a fixed-batch artifact: pad with copies, drop their answers
        padded = torch.cat([batch, batch[:1].expand(pad, *batch.shape[1:])]) if pad else batch
        outs.append(model(padded).float().cpu()[: len(batch)])
    got = torch.cat(outs)
    if got.shape != expected.shape:
        raise CompressorError(f"{where}: answers the self-test with shape {tuple(got.shape)}, not "
                              f"{tuple(expected.shape)}")
    agreement = float((got.argmax(1) == torch.tensor(record["top1"])).float().mean())
    drift = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))
    result = {"images": count, "top1_agreement": agreement, "max_relative_diff": drift}
    if agreement < record["min_agreement"] or drift > record["max_relative_diff"]:
        raise CompressorError(
            f"{where} answers differently on this machine than where it was exported, so it is refused: on its "
            f"{count} self-test inputs, top-1 agreement {agreement:.0%} (needs {record['min_agreement']:.0%}) and "
            f"logits off by up to {drift:.1%} of their range (allowed {record['max_relative_diff']:.0%}). This CPU: "
            f"{cpu_features()}; exported on: {str(record.get('exported_on', 'unknown'))[:200]}. int8 kernels "
            "for signed weights saturate on x86 CPUs without VNNI: re-export with --int8-scheme s8s8-reduced "
            "(the default) or u8u8, or pass --skip-self-test (self_test=False) to serve it anyway")
    return result
