"""metrics.json as a typed, versioned RunRecord; the versioned settings files of --resume and compare."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict

import pytest

from compressor import compare as study
from compressor import pipeline
from compressor.cli import main
from compressor.errors import CompressorError
from compressor.files import write_json
from compressor.pipeline import RunConfig, run
from compressor.record import FORMAT, RunRecord
from compressor.resume import STATE_DIR
from compressor.rundir import RunDir

TINY = dict(model="conv4", dataset="synthetic", round_to=4, batch_size=64)
KEYS = ["format", "status", "resumed", "out", "date", "command", "config", "training_defaults", "model", "dataset",
        "method", "budget", "accuracy", "epochs", "distill", "macs", "params", "widths", "criterion", "seconds",
        "seconds_per_epoch", "history", "device", "versions"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A real (tiny) finished run: its directory, what run() returned and what metrics.json holds."""
    out = tmp_path_factory.mktemp("record") / "run"
    returned = run(RunConfig(**TINY, epochs=1, finetune_epochs=1, out=str(out)))
    return out, returned, json.loads((out / "metrics.json").read_text())


def test_run_writes_a_record_with_the_same_keys_as_before(finished):
    out, returned, saved = finished
    assert list(saved) == KEYS and saved["format"] == FORMAT  # the old keys, in order, and the format first
    assert returned == saved and RunDir(out).read_metrics() == saved
    record = RunRecord.from_json(saved, out / "metrics.json")
    assert record.to_json() == saved
    assert record.accuracy.dense.test == saved["accuracy"]["dense"]["test"]
    assert record.epochs.after_dense == saved["epochs"]["after_dense"] == 1
    assert record.macs.fraction == saved["macs"]["fraction"] and record.distill is None and record.latency is None
    assert "fine-tuned" in pipeline.summary(saved, out) == pipeline.summary(record, out)


def test_a_record_round_trips_with_the_entries_other_tools_add(finished):
    _, _, saved = finished
    data = saved | {"latency": {"target_ms": 1.0}, "export": {"onnx": {"path": "x.onnx"}}, "bench": [1, 2]}
    data["distill"] = {"weight": 0.5, "temperature": 4.0}
    record = RunRecord.from_json(json.loads(json.dumps(data)), "metrics.json")
    assert record.latency == {"target_ms": 1.0} and record.export == {"onnx": {"path": "x.onnx"}}
    assert record.extra == {"bench": [1, 2]} and record.distill.weight == 0.5
    again = record.to_json()
    assert again == data and list(again)[:13] == KEYS[:12] + ["latency"]  # latency where it always was
    assert RunRecord.from_json(again, "metrics.json") == record


def _no_format(m):
    m.pop("format")


def _newer(m):
    m["format"] = "compressor.run/2"


def _missing(m):
    del m["accuracy"]["pruned"]


def _wrong_kind(m):
    m["macs"] = 5


BAD = [(_no_format, "found no format"), (_newer, "found 'compressor.run/2'"),
       (_missing, "found 'compressor.run/1' without its field 'accuracy.pruned'"),
       (_wrong_kind, "found 'compressor.run/1' with 'macs' of the wrong kind")]
IDS = ["old", "newer", "missing-field", "wrong-kind"]


def _bad_copy(finished, tmp_path, spoil, name="run"):
    """A finished run directory (metrics.json only) whose record ``spoil`` has made foreign."""
    _, _, saved = finished
    m = copy.deepcopy(saved)
    spoil(m)
    out = tmp_path / name
    write_json(out / "metrics.json", m)
    return out, m


def _one_message(text: str, path, found: str):
    assert f"{path}" in text and f"format {FORMAT!r} expected" in text and found in text, text
    assert "\n" not in text.strip()


@pytest.mark.parametrize("spoil, found", BAD, ids=IDS)
def test_from_json_refuses_another_format(finished, tmp_path, spoil, found):
    out, m = _bad_copy(finished, tmp_path, spoil)
    with pytest.raises(CompressorError) as exc:
        RunRecord.from_json(m, out / "metrics.json")
    _one_message(str(exc.value), out / "metrics.json", found)
    assert "--overwrite" in str(exc.value)
    with pytest.raises(CompressorError, match="is not a finished run's record"):
        RunDir(out).read_metrics()


@pytest.mark.parametrize("spoil, found", BAD, ids=IDS)
def test_resume_of_a_finished_run_refuses_another_format(finished, tmp_path, capsys, spoil, found):
    out, _ = _bad_copy(finished, tmp_path, spoil)
    with pytest.raises(CompressorError) as exc:
        run(RunConfig(**TINY, out=str(out), resume=True))
    _one_message(str(exc.value), out / "metrics.json", found)
    capsys.readouterr()
    assert main(["run", "--dataset", "synthetic", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    _one_message(err, out / "metrics.json", found)
    assert "Traceback" not in err


@pytest.mark.parametrize("spoil, found", BAD, ids=IDS)
def test_compare_refuses_a_cell_of_another_format(finished, tmp_path, monkeypatch, spoil, found):
    def no_training(config):
        raise CompressorError("not in this test")

    monkeypatch.setattr(study, "run", no_training)
    dense = tmp_path / "dense.pt"
    dense.write_bytes(b"a checkpoint")
    base = RunConfig(**TINY, checkpoint=str(dense), pruning_epochs=1)
    with pytest.raises(CompressorError, match="1 cell"):  # the study is claimed; its cell did not run
        study.compare(base, ["l1"], [("params", 0.3)], [0], tmp_path / "s")
    saved = json.loads((tmp_path / "s" / study.SETTINGS).read_text())
    assert saved["format"] == study.SETTINGS_FORMAT
    cell, _ = _bad_copy(finished, tmp_path / "s" / "cells", spoil, "l1-params0.3-s0")
    with pytest.raises(CompressorError) as exc:
        study.compare(base, ["l1"], [("params", 0.3)], [0], tmp_path / "s")
    _one_message(str(exc.value), cell / "metrics.json", found)
    assert "delete the cell's folder" in str(exc.value)


@pytest.mark.parametrize("saved_format, found", [(None, "found no format"), ("compressor.compare-settings/2",
                                                                               "'compressor.compare-settings/2'")])
def test_compare_refuses_settings_of_another_format(tmp_path, saved_format, found):
    dense = tmp_path / "dense.pt"
    dense.write_bytes(b"a checkpoint")
    base = RunConfig(**TINY, checkpoint=str(dense), pruning_epochs=1)
    settings = {k: v for k, v in asdict(base).items() if k not in pipeline.field_names("per_cell")}
    write_json(tmp_path / "s" / study.SETTINGS, settings | ({"format": saved_format} if saved_format else {}))
    with pytest.raises(CompressorError) as exc:
        study.compare(base, ["l1"], [("params", 0.3)], [0], tmp_path / "s")
    text = str(exc.value)
    assert f"{tmp_path / 's' / study.SETTINGS}" in text and found in text and "choose another --out" in text
    assert f"format {study.SETTINGS_FORMAT!r} expected" in text


@pytest.mark.parametrize("change, found", [
    (lambda s: s.pop("format"), "found no format"),
    (lambda s: s.update(format="compressor.run-settings/2"), "found 'compressor.run-settings/2'"),
    (lambda s: s.update(budget_fraction=0.5), "with a setting 'budget_fraction' it does not define"),
], ids=["old", "newer", "renamed-field"])
def test_resume_refuses_run_settings_of_another_format(tmp_path, capsys, change, found):
    out = tmp_path / "run"
    settings = pipeline._comparable(RunConfig(**TINY, epochs=1))
    change(settings)
    path = out / STATE_DIR / pipeline.RUN_JSON
    write_json(path, settings)
    with pytest.raises(CompressorError) as exc:
        run(RunConfig(**TINY, out=str(out), resume=True))
    text = str(exc.value)
    assert f"{path}" in text and f"format {pipeline.RUN_JSON_FORMAT!r} expected" in text and found in text, text
    assert "--overwrite" in text
    assert main(["run", "--dataset", "synthetic", "--out", str(out), "--resume"]) == 2
    assert found in capsys.readouterr().err


def test_field_roles_are_declared_on_the_fields():
    """The roles the hand-kept lists gave (pipeline._NOT_SETTINGS, compare._PER_CELL), now field metadata."""
    assert set(RunConfig.__dataclass_fields__) - set(pipeline.field_names("setting", True)) == {
        "resume", "overwrite", "argv", "out", "workers", "trust_factories"}
    assert set(pipeline.field_names("per_cell")) == {
        "method", "budget_metric", "budget", "criterion", "argv", "data_dir", "data_mode", "workers", "device",
        "trust_factories"}
    saved = pipeline._comparable(RunConfig(out="x", resume=True, workers=3))
    assert saved["format"] == pipeline.RUN_JSON_FORMAT and not {"out", "resume", "workers"} & set(saved)


def test_export_still_adds_its_results_to_an_older_runs_file(finished, tmp_path):
    out, _ = _bad_copy(finished, tmp_path, _no_format)
    RunDir(out).update_metrics("export", {"onnx": {"path": "model.onnx"}})
    m = json.loads((out / "metrics.json").read_text())
    assert m["export"] == {"onnx": {"path": "model.onnx"}} and "format" not in m  # the file is otherwise as it was
