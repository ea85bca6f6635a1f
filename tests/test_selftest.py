"""An artifact's self-test: recorded at export, re-run by runtime.load on the machine that serves it."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from compressor import models, runtime, selftest
from compressor.errors import CompressorError
from compressor.export import INT8_MAX_RELATIVE_DIFF, quantize, verify
from compressor.export import onnx as onnx_export


def exported(model: nn.Module, x: torch.Tensor, path, min_agreement: float = 0.99):
    """``model`` as an fp32 ONNX at ``path`` with its self-test recorded, as compress export leaves it."""
    onnx_export.export(model, path, x[:2])
    return recorded(model, x, path, min_agreement)


def recorded(model, x, path, min_agreement):
    with torch.no_grad():
        reference = model(x)
    got = onnx_export.OnnxRuntimeModel(path)(x)
    record = selftest.make(x, reference, got, min_agreement, "onnx")
    runtime.write_self_test(path, record)
    return record


def test_a_recorded_self_test_passes_where_it_was_made(tmp_path):
    torch.manual_seed(0)
    model = models.create("conv4", 10, 1).eval()
    x = torch.randn(40, 1, 28, 28)
    record = exported(model, x, tmp_path / "m.onnx")
    assert record["count"] == selftest.MAX_IMAGES and record["exported_on"] == selftest.cpu_features()
    loaded = runtime.load(tmp_path / "m.onnx")
    assert loaded.self_test == {"images": 16, "top1_agreement": 1.0,
                                "max_relative_diff": pytest.approx(0, abs=1e-4)}


def test_an_artifact_that_answers_otherwise_is_refused_naming_the_cpu(tmp_path):
    """The record says what the artifact answered at export; an artifact changed since is refused."""
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    model = models.create("conv4", 10, 1).eval()
    path = tmp_path / "m.onnx"
    exported(model, torch.randn(40, 1, 28, 28), path)
    proto = onnx.load(str(path))
    last = [t for t in proto.graph.initializer if numpy_helper.to_array(t).ndim == 2][-1]  # the classifier
    last.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(last), last.name))
    onnx.save(proto, str(path))
    with pytest.raises(CompressorError, match=r"answers differently on this machine.*This CPU: .*x86_64|aarch64"):
        runtime.load(path)
    assert runtime.load(path, self_test=False).self_test is None


def test_a_malformed_record_is_one_clear_error(tmp_path):
    torch.manual_seed(0)
    model = models.create("conv4", 10, 1).eval()
    path = tmp_path / "m.onnx"
    record = exported(model, torch.randn(8, 1, 28, 28), path)
    for bad in ({**record, "count": 10_000}, {**record, "inputs": "!!"}, {**record, "format": "x"}, [1]):
        onnx_export.write_metadata(path, {selftest.KEY: json.dumps(bad)})
        with pytest.raises(CompressorError, match="self-test"):
            runtime.load(path)


# -- int8 that saturates signed kernels on x86 CPUs without VNNI ----------------------------------

def saturating() -> nn.Module:
    """A conv whose every weight is large and of one sign per filter, fed by large post-ReLU activations:
    x86 kernels that multiply uint8 by int8 in 16-bit pair sums (vpmaddubsw) overflow on it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        m[0].weight.abs_()
        m[0].bias.fill_(0.5)
        m[2].weight.copy_(m[2].weight.abs() + 0.05)
        m[2].weight[:16].neg_()
    return m.eval()


def has_vnni() -> bool:
    return "AVX512VNNI" in selftest.cpu_features() or "avx_vnni" in open("/proc/cpuinfo").read()


@pytest.mark.slow
def test_int8_saturation_is_caught_by_the_export_or_the_self_test(tmp_path):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the saturation is an x86 kernel's (this CPU is not x86)")
    model, x = saturating(), torch.rand(64, 3, 16, 16) * 2 - 0.5
    onnx_export.export(model, tmp_path / "m.onnx", x[:2])
    with torch.no_grad():
        reference = model(x)
    results = {}
    for scheme in ("s8s8", "u8u8", "s8s8-reduced"):
        path = quantize.quantize(tmp_path / "m.onnx", tmp_path / f"m-{scheme}.onnx", x, scheme=scheme)
        got = onnx_export.OnnxRuntimeModel(path)(x)
        try:
            verify(reference, got, 0.95, scheme, INT8_MAX_RELATIVE_DIFF)
            results[scheme] = "verified"
            runtime.write_self_test(path, selftest.make(x, reference, got, 0.95, "onnx-int8"))
        except CompressorError as exc:
            results[scheme] = str(exc)
    assert results["u8u8"] == results["s8s8-reduced"] == "verified"  # both answer alike everywhere
    if not has_vnni():  # here the export itself meets the saturation, and refuses it
        assert "saturate on x86 CPUs without VNNI" in results["s8s8"]
        return
    assert results["s8s8"] == "verified"  # VNNI computes it exactly: only a CPU without VNNI shows the harm
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("this CPU has VNNI, so the saturation needs a CPU without it: qemu-x86_64 (Debian's qemu-user) "
                    "emulates one (AMD EPYC-Rome, AVX2 only) and is not installed")
    script = textwrap.dedent(f"""
        import json
        from compressor import runtime
        out = {{}}
        for scheme in ("s8s8", "u8u8", "s8s8-reduced"):
            try:
                out[scheme] = runtime.load({str(tmp_path)!r} + f"/m-{{scheme}}.onnx").self_test
            except Exception as exc:
                out[scheme] = str(exc)
        print(json.dumps(out))
    """)
    done = subprocess.run([qemu, "-cpu", "EPYC-Rome", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    served = json.loads(done.stdout.strip().splitlines()[-1])
    assert "answers differently on this machine" in served["s8s8"]
    here, exported_on = served["s8s8"].split("This CPU: ")[1].split("; exported on: ")
    assert "AVX2" in here and "VNNI" not in here and "AVX512VNNI" in exported_on  # the message names both CPUs
    for portable in ("u8u8", "s8s8-reduced"):
        assert served[portable]["top1_agreement"] == 1.0 and served[portable]["max_relative_diff"] < 1e-3


def test_a_checkpoint_carries_its_self_test_and_the_loader_runs_it(tmp_path):
    from compressor import checkpoint

    torch.manual_seed(0)
    model = models.create("conv4", 10, 1).eval()
    spec = checkpoint.spec_for(model, "conv4", {"num_classes": 10, "in_channels": 1}, [1, 28, 28], 10)
    x = torch.randn(20, 1, 28, 28)
    with torch.no_grad():
        logits = model(x)
    record = selftest.make(x, logits, logits, 0.99, "checkpoint")
    path = checkpoint.save(model, spec, tmp_path / "m.pt", self_test=record)
    assert checkpoint.recorded_self_test(path)["count"] == 16
    assert runtime.load(path).self_test["top1_agreement"] == 1.0
    wrong = dict(record, logits=selftest._encode(-logits[:16]))
    checkpoint.save(model, spec, path, self_test=wrong)
    with pytest.raises(CompressorError, match="answers differently on this machine"):
        runtime.load(path)
    assert runtime.load(path, self_test=False).self_test is None


@pytest.mark.e2e
def test_a_run_records_the_self_test_of_both_checkpoints(tmp_path):
    from compressor import checkpoint
    from compressor.pipeline import RunConfig, run

    run(RunConfig(dataset="synthetic", epochs=1, finetune_epochs=0, out=str(tmp_path / "run"), device="cpu"))
    for name in ("dense.pt", "pruned.pt"):
        assert checkpoint.recorded_self_test(tmp_path / "run" / name)["kind"] == "checkpoint"
        assert runtime.load(tmp_path / "run" / name).self_test["top1_agreement"] == 1.0
