"""A model factory that fails, and output folders that cannot be made: one clear message, the same from the
API and the CLI, exit code 2 and no traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from compressor import models
from compressor.errors import CompressorError
from compressor.pipeline import RunConfig, run


@pytest.fixture
def broken(tmp_path, monkeypatch):
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "brokenzoo.py").write_text(textwrap.dedent("""
        def raises(num_classes=10, in_channels=3):
            raise ValueError("no such depth")
    """))
    (folder / "failsonimport.py").write_text("raise RuntimeError('half-installed plug-in')\n")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    return folder


def cli(*args, timeout=300):
    done = subprocess.run([sys.executable, "-m", "compressor", *args], capture_output=True, text=True,
                          timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_a_factory_that_raises(broken):
    with pytest.raises(CompressorError, match=r"model factory 'brokenzoo:raises' failed with ValueError: no such "
                                              r"depth"):
        models.create("brokenzoo:raises")
    with pytest.raises(CompressorError, match=r"importing 'failsonimport' .* failed with RuntimeError: half"):
        models.create("failsonimport:net")


def test_a_factory_that_raises_through_the_cli(broken, tmp_path):
    done = cli("run", "--model", "brokenzoo:raises", "--dataset", "synthetic", "--epochs", "0",
               "--finetune-epochs", "0", "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "model factory 'brokenzoo:raises' failed with ValueError: no such depth" in done.stderr


def test_out_under_a_regular_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = RunConfig(dataset="synthetic", epochs=0, finetune_epochs=0, out=str(blocker / "run"))
    with pytest.raises(CompressorError, match=f"--out {blocker / 'run'} cannot be created: {blocker} is a file"):
        run(config)
    done = cli("run", "--dataset", "synthetic", "--epochs", "0", "--finetune-epochs", "0", "--out",
               str(blocker / "deeper" / "run"))
    assert done.returncode == 2 and f"{blocker} is a file, not a directory" in done.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere, so no folder is unwritable to it")
def test_out_where_no_folder_can_be_made(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(CompressorError, match="cannot be created"):
        run(RunConfig(dataset="synthetic", epochs=0, finetune_epochs=0, out=str(locked / "run")))


def test_out_on_a_path_the_system_refuses(tmp_path):
    name = tmp_path / ("x" * 300) / "run"  # a name longer than any file system allows
    with pytest.raises(CompressorError, match="cannot be created"):
        run(RunConfig(dataset="synthetic", epochs=0, finetune_epochs=0, out=str(name)))


def test_export_and_compare_out_under_a_regular_file(tmp_path):
    from compressor.compare import compare
    from compressor.export.run import export

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CompressorError, match="is a file, not a directory"):
        compare(RunConfig(dataset="synthetic", epochs=1, pruning_epochs=1), ["l1"], [("params", 0.5)], [0],
                blocker / "study", configs={})
    ckpt = tmp_path / "m.pt"
    from compressor import checkpoint

    model = models.create("conv4", 10, 1)
    checkpoint.save(model, checkpoint.spec_for(model, "conv4", {"num_classes": 10, "in_channels": 1}, [1, 28, 28],
                                               10, dataset="synthetic"), ckpt)
    with pytest.raises(CompressorError, match="is a file, not a directory"):
        export(ckpt, "onnx", out=blocker / "export")


def test_a_run_stopped_by_bad_data_can_be_run_again_as_it_was(tmp_path):
    """Nothing was done, so nothing is in the way: the same command runs once the data set is fixed."""
    from PIL import Image

    folder = tmp_path / "set"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (folder / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (40 * i, 0, 0) if c == "a" else (0, 40 * i, 0)).save(
                    folder / split / c / f"{i}.png")
    broken = folder / "train" / "a" / "bad.png"
    broken.write_bytes(b"not an image")
    config = RunConfig(dataset=str(folder), epochs=0, finetune_epochs=0, out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(CompressorError, match="bad.png"):
        run(config)
    broken.unlink()
    assert run(config)["status"] == "complete"
