"""Nothing inside a file the toolkit reads may choose code to run.

Every reader gets a crafted file whose payload, if it ran, would create a marker file: a
model factory in a module of the test's own (``evilzoo:net`` writes the marker when called,
so the trusted case shows the payload is live), or a pickle whose ``__reduce__`` runs a shell
command. Each test checks the reader's one clear error and that the marker is absent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import compressor
from compressor import checkpoint, models, runtime
from compressor.errors import CompressorError

EVIL = "evilzoo:net"


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module ``evilzoo`` on sys.path whose factory ``net`` creates a marker file, and that marker's path."""
    marker = tmp_path / "marker"
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "evilzoo.py").write_text(textwrap.dedent(f"""
        from compressor import models

        def net(num_classes=10, in_channels=3):
            open({str(marker)!r}, "w").close()
            return models.create("conv4", num_classes, in_channels)
    """))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delitem(sys.modules, "evilzoo", raising=False)
    return marker


def conv4_checkpoint(path: Path, model_name: str = "conv4", kwargs: dict | None = None, **spec_fields) -> Path:
    model = models.create("conv4", 10, 1)
    spec = checkpoint.spec_for(model, "conv4", {"num_classes": 10, "in_channels": 1}, [1, 28, 28], 10)
    spec.model, spec.factory_kwargs = model_name, kwargs if kwargs is not None else spec.factory_kwargs
    for k, v in spec_fields.items():
        setattr(spec, k, v)
    return checkpoint.save(model, spec, path)


# -- checkpoints: the spec's factory ---------------------------------------------------------

def test_checkpoint_naming_an_untrusted_factory_is_refused_before_import(tmp_path, evil):
    path = conv4_checkpoint(tmp_path / "m.pt", EVIL)
    for load in (lambda: compressor.load(path), lambda: runtime.load(path), lambda: checkpoint.read(path) and
                 checkpoint.build(checkpoint.read(path)[0])):
        with pytest.raises(CompressorError, match=r"names the model factory 'evilzoo:net'.*--trust-factory "
                                                  r"evilzoo:net \(Python: trusted_factories=\['evilzoo:net'\]\)"):
            load()
    assert not evil.exists() and "evilzoo" not in sys.modules


def test_a_trusted_factory_is_called(tmp_path, evil):
    """The positive control: the payload is live, so its absence above is the refusal's doing."""
    path = conv4_checkpoint(tmp_path / "m.pt", EVIL)
    model = compressor.load(path, trusted_factories=[EVIL])
    assert evil.exists() and isinstance(model, torch.nn.Module)
    evil.unlink()
    assert runtime.load(path, trusted_factories=[EVIL])(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert evil.exists()


def test_os_system_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = conv4_checkpoint(tmp_path / "m.pt", "os:system", {"command": f"touch {marker}"})
    with pytest.raises(CompressorError, match="'os:system'"):
        compressor.load(path)
    assert not marker.exists()


def test_torchvision_classification_models_are_allowed_and_others_not(tmp_path):
    assert models.is_trusted("torchvision.models:resnet18")
    assert not models.is_trusted("torchvision.models.detection:fasterrcnn_resnet50_fpn")
    assert not models.is_trusted("torchvision.models:list_models")
    assert not models.is_trusted("torchvision.models:resnet18x")
    assert models.is_trusted("conv4") and not models.is_trusted(None)


@pytest.mark.parametrize("kwargs, words", [
    ({"num_classes": 10, "weights": "IMAGENET1K_V1"}, "would download"),
    ({"num_classes": {"a": {"b": {"c": {"d": {"e": 1}}}}}}, "plain JSON values"),
    ({"num_classes": 10, "bogus": 1}, "takes no argument bogus"),
    ("rm -rf", "not a JSON object"),
])
def test_factory_arguments_are_checked(tmp_path, kwargs, words):
    name = "torchvision.models:resnet18" if "weights" in kwargs else "conv4"
    with pytest.raises(CompressorError, match=words):
        models.check_kwargs(name, kwargs)


@pytest.mark.parametrize("field, value, words", [
    ("input_shape", [1, 100000, 100000], "input_shape"),
    ("num_classes", "10", "num_classes"),
    ("widths", {"a": -1}, "widths"),
    ("normalization", {"mean": ["x"], "std": [1]}, "normalization"),
    ("classes", "abc", "classes"),
])
def test_malformed_spec_fields_are_refused(tmp_path, field, value, words):
    path = conv4_checkpoint(tmp_path / "m.pt", **{field: value})
    with pytest.raises(CompressorError, match=f"malformed: .*{words}"):
        compressor.load(path)


def test_pickled_payload_in_a_checkpoint_does_not_run(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "m.pt"
    torch.save({"format": checkpoint.FORMAT, "spec": "{}", "state_dict": Payload(marker)}, path)
    with pytest.raises(CompressorError, match="pickled Python objects"):
        compressor.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, words", [
    (b'{"format": "compressor.checkpoint/1"}', r"text file \(JSON\?\)"),
    (bytes(range(256)), "binary data"),  # fixed: random bytes may begin with "{" and read as JSON
    (b"", "an empty file"),
])
def test_not_a_torch_file_is_not_called_pickled(tmp_path, content, words):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(CompressorError, match=words) as err:
        compressor.load(path)
    assert "pickled" not in str(err.value)


def test_cli_refuses_then_trusts(tmp_path, evil):
    path = conv4_checkpoint(tmp_path / "m.pt", EVIL)
    cmd = [sys.executable, "-m", "compressor", "inspect", str(path)]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().count("\n") == 0 and "--trust-factory evilzoo:net" in refused.stderr
    assert not evil.exists()
    trusted = subprocess.run(cmd + ["--trust-factory", EVIL], capture_output=True, text=True, timeout=120)
    assert trusted.returncode == 0, trusted.stderr
    assert evil.exists() and json.loads(trusted.stdout)["spec"]["model"] == EVIL


# -- a run's saved state -----------------------------------------------------------------------

def test_training_state_payload_does_not_run(tmp_path):
    from compressor.resume import FORMAT, StageState

    marker = tmp_path / "marker"
    path = tmp_path / "train.pt"
    torch.save({"format": FORMAT, "model": Payload(marker)}, path)
    with pytest.raises(CompressorError, match="cannot read the training state"):
        StageState(path).load()
    assert not marker.exists()


def test_resumed_run_settings_naming_an_untrusted_factory_are_refused(tmp_path, evil):
    from compressor import pipeline
    from compressor.files import write_json
    from compressor.resume import STATE_DIR

    out = tmp_path / "run"
    write_json(out / STATE_DIR / pipeline.RUN_JSON,
               pipeline._comparable(pipeline.RunConfig(model=EVIL, dataset="synthetic", epochs=1)))
    config = pipeline.RunConfig(dataset="synthetic", out=str(out), resume=True)
    with pytest.raises(CompressorError, match=r"interrupted run's settings.*names the model factory 'evilzoo:net'"):
        pipeline.run(config)
    assert not evil.exists()
    (out / STATE_DIR / pipeline.RUN_JSON).write_text('["not", "settings"]')
    with pytest.raises(CompressorError, match="does not hold a run's settings"):
        pipeline.run(config)


def test_smoea_state_payload_and_foreign_weights_path_are_refused(tmp_path):
    from compressor.criteria import smoea

    marker = tmp_path / "marker"
    torch.save(Payload(marker), tmp_path / smoea.STATE)
    with pytest.raises(CompressorError, match="cannot read the smoea state"):
        smoea._load_state(tmp_path)
    assert not marker.exists()
    secret = tmp_path.parent / "secret.pt"
    torch.save({"w": torch.zeros(1)}, secret)
    torch.save({"block": 0, "weights": f"../{secret.name}"}, tmp_path / smoea.STATE)
    with pytest.raises(CompressorError, match="not one this code wrote"):
        smoea._load_state(tmp_path)


def test_study_and_bench_journals_are_data(tmp_path):
    from compressor import compare
    from compressor.bench.run import Journal

    (tmp_path / compare.SETTINGS).write_text('"os:system"')
    with pytest.raises(CompressorError, match="does not hold a study's settings"):
        compare._claim(tmp_path, {"criteria": {}})
    (tmp_path / compare.SETTINGS).write_text("{not json")
    with pytest.raises(CompressorError, match="is damaged"):
        compare._claim(tmp_path, {"criteria": {}})
    cell = compare.Cell("l1", "params", 0.5, 0)
    with pytest.raises(CompressorError, match="not a finished run's record"):
        compare._record(cell, {"accuracy": "os:system"}, tmp_path, 0.0)
    journal = tmp_path / "bench.jsonl"
    journal.write_text('["point"]\n{"type": "point", "backend": {"x": 1}}\n'
                       '{"type": "point", "backend": "ort", "precision": "fp32", "batch": 1}\n')
    header, points = Journal.read(journal)
    assert header is None and [p["backend"] for p in points] == ["ort"]


# -- artifacts' metadata -----------------------------------------------------------------------

def test_onnx_spec_is_a_label_checked_as_data(tmp_path, evil):
    from compressor.export import onnx

    model = models.create("conv4", 10, 1).eval()
    path = onnx.export(model, tmp_path / "m.onnx", torch.zeros(2, 1, 28, 28))
    spec = {"model": EVIL, "factory_kwargs": {}, "input_shape": [1, 28, 28], "num_classes": 10}
    onnx.write_metadata(path, {onnx.SPEC_KEY: json.dumps(spec)})
    loaded = runtime.load(path)  # the spec describes the graph; nothing is built from it
    assert loaded.spec.model == EVIL and not evil.exists() and "evilzoo" not in sys.modules
    onnx.write_metadata(path, {onnx.SPEC_KEY: json.dumps(spec | {"input_shape": [1, 1 << 20, 1 << 20]})})
    with pytest.raises(CompressorError, match="input_shape"):
        runtime.load(path)


def test_aoti_sidecar_cannot_name_a_torch_attribute(tmp_path, evil):
    path = tmp_path / "m.pt2"
    with zipfile.ZipFile(path, "w") as archive:  # what package_metadata reads: a device, nothing compiled
        archive.writestr("m/data/aotinductor/model/x_metadata.json", json.dumps({"AOTI_DEVICE_KEY": "cpu"}))
    spec = {"model": EVIL, "factory_kwargs": {}, "input_shape": [1, 28, 28], "num_classes": 10}
    runtime.sidecar_path(path).write_text(json.dumps({"dtype": "save", "spec": spec}))
    with pytest.raises(CompressorError, match="input dtype 'save'"):
        runtime.load(path)
    assert not evil.exists() and "evilzoo" not in sys.modules


def test_engine_sidecar_is_not_read_on_a_cpu(tmp_path, evil):
    path = tmp_path / "m.engine"
    path.write_bytes(b"not an engine")
    runtime.sidecar_path(path).write_text(json.dumps({"spec": {"model": EVIL}, "self_test": "x"}))
    with pytest.raises(CompressorError, match="runs only on a CUDA GPU"):
        runtime.load(path, "cpu")
    assert not evil.exists()


@pytest.mark.parametrize("field, value, words", [("device", "bogus", "names the device 'bogus'"),
                                                 ("device", {"x": 1}, "names the device"),
                                                 ("max_batch", "x", "max_batch 'x'"),
                                                 ("min_batch", -3, "min_batch -3"),
                                                 ("input_shape", ["a", 2, 3], "input_shape"),
                                                 ("num_classes", 0, "num_classes 0")])
def test_aoti_sidecar_fields_are_checked(tmp_path, field, value, words):
    path = tmp_path / "m.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data/aotinductor/model/x_metadata.json", json.dumps({"AOTI_DEVICE_KEY": "cpu"}))
    runtime.sidecar_path(path).write_text(json.dumps({field: value}))
    with pytest.raises(CompressorError, match=words):
        runtime.load(path)


def test_onnx_recorded_batch_limit_is_checked(tmp_path):
    from compressor.export import onnx

    path = onnx.export(models.create("conv4", 10, 1).eval(), tmp_path / "m.onnx", torch.zeros(2, 1, 28, 28))
    onnx.write_metadata(path, {onnx.MAX_BATCH_KEY: "lots"})
    with pytest.raises(CompressorError, match="max_batch 'lots' is not a positive whole number"):
        runtime.load(path)
