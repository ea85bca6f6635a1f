"""Streaming ImageFolder data (DataLoader workers) and training defaults chosen by device."""
import json

import pytest
import torch

from compressor import data as datasets
from compressor import stream
from compressor.train import TrainConfig, device_defaults, resolve_defaults


def _folder(root, classes=3, train=12, test=4, size=64):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                base = torch.zeros(3, 1, 1)
                base[c] = 1.0
                x = (0.5 * base + 0.5 * torch.rand(3, size, size, generator=g)) * 255
                Image.fromarray(x.byte().permute(1, 2, 0).numpy()).save(d / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("jpegs") / "tiny")


def test_stream_eval_matches_memory(folder):
    mem = datasets.load(str(folder), val_fraction=0.25, seed=0, cache_dir=folder.parent / "cache")
    st = datasets.load(str(folder), val_fraction=0.25, seed=0, mode="stream", workers=2)
    assert isinstance(st, stream.StreamData) and isinstance(mem, datasets.ImageData)
    assert st.input_shape == mem.input_shape == [3, 64, 64] and st.classes == mem.classes
    assert st.mean == pytest.approx(mem.mean, abs=1e-5) and st.std == pytest.approx(mem.std, abs=1e-5)
    for split in ("val", "test"):
        assert torch.equal(getattr(st, f"{split}_y"), getattr(mem, f"{split}_y"))
        a = list(datasets.batches(st, split, 5, "cpu"))
        b = list(datasets.batches(mem, split, 5, "cpu"))
        assert len(a) == len(b)
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-5)
    sub = datasets.val_subset(st, 4)
    assert len(sub.val_y) == 4 and torch.equal(sub.val_y, mem.val_y[:4])


def test_stream_training_batches_and_resume(folder):
    st = datasets.load(str(folder), val_fraction=0.25, seed=0, mode="stream", workers=2)
    n = len(st.train_y)  # 27 of 36
    b = datasets.batches(st, "train", 8, "cpu", train=True, seed=3)
    assert len(b) == 4
    shapes = [tuple(x.shape) for x, _ in b]
    assert shapes == [(8, 3, 64, 64)] * 3 + [(n - 24, 3, 64, 64)]
    assert len(datasets.batches(st, "train", 8, "cpu", train=True, drop_last=True)) == 3

    first = datasets.batches(st, "train", 8, "cpu", train=True, seed=3)
    state = first.generator.get_state()
    order = first.epoch_order()
    full = list(first.iterate(order))
    after = first.generator.get_state()
    again = datasets.batches(st, "train", 8, "cpu", train=True, seed=99)  # a new process, resuming
    again.generator.set_state(state)
    resumed = list(again.iterate(again.epoch_order(), 2))  # the same order from the restored state, batch 2 on
    assert torch.equal(again.generator.get_state(), after)
    assert len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(full[2:], resumed):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    saved = datasets.batches(st, "train", 8, "cpu", train=True, seed=5)  # the order itself, as fit saves it
    for (xa, ya), (xb, yb) in zip(full[1:], saved.iterate(order.clone(), 1)):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_stream_large_images_use_imagenet_transforms(tmp_path):
    root = _folder(tmp_path / "big", classes=2, train=3, test=2, size=96)
    st = datasets.load(str(root), val_fraction=0.0, mode="stream", workers=0)
    assert (st.crop, st.resize) == (96, 110) and st.input_shape == [3, 96, 96]
    x, _ = next(iter(datasets.batches(st, "train", 4, "cpu", train=True)))
    assert x.shape == (4, 3, 96, 96)


def test_auto_mode_and_refusals(folder, tmp_path):
    assert isinstance(datasets.load(str(folder), mode="auto", cache_dir=tmp_path), datasets.ImageData)
    with pytest.raises(datasets.DataError, match="ImageFolder"):
        datasets.load("synthetic", mode="stream")
    with pytest.raises(datasets.DataError, match="data-mode"):
        datasets.load("synthetic", mode="disk")


def test_run_stream_torchvision_resnet18(folder, tmp_path):
    from compressor.cli import main

    out = tmp_path / "run"
    main(["run", "--dataset", str(folder), "--data-mode", "stream", "--workers", "2",
          "--model", "torchvision.models:resnet18", "--epochs", "1", "--finetune-epochs", "0",
          "--budget-macs", "0.5", "--batch-size", "8", "--device", "cpu", "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["macs"]["fraction"] <= 0.55 and len(m["history"]["train"]) == 1
    assert m["training_defaults"]["batch_size"] == 8 and "batch_size" not in m["training_defaults"]["chosen"]
    spec = torch.load(out / "pruned.pt", weights_only=False)
    assert "normalization" in json.dumps(spec, default=str)


def test_device_defaults():
    cpu, cuda = device_defaults("cpu"), device_defaults("cuda")
    assert cpu == {"batch_size": 128, "lr": 0.05, "finetune_lr": 0.01, "label_smoothing": 0.0, "compile": False}
    assert cuda["batch_size"] == 512 and cuda["lr"] == pytest.approx(0.2) and cuda["finetune_lr"] == pytest.approx(0.04)
    assert cuda["label_smoothing"] == 0.1 and cuda["compile"] is True
    open_ = dict.fromkeys(("batch_size", "lr", "finetune_lr", "label_smoothing", "compile"))
    values, chosen = resolve_defaults("cuda", open_)
    assert values == cuda and sorted(chosen) == sorted(open_)
    values, chosen = resolve_defaults("cuda", {**open_, "batch_size": 256, "label_smoothing": 0.0, "compile": "off"})
    assert values["batch_size"] == 256 and values["lr"] == pytest.approx(0.1) and values["label_smoothing"] == 0.0
    assert values["compile"] is False and sorted(chosen) == ["finetune_lr", "lr"]
    values, chosen = resolve_defaults("cpu", {**open_, "batch_size": 64, "lr": 0.3, "compile": "auto"})
    assert values == {**cpu, "batch_size": 64, "lr": 0.3} and "compile" in chosen
    with pytest.raises(Exception, match="compile"):
        TrainConfig(1, compile="on")


def test_run_records_cpu_defaults(tmp_path):
    from compressor.pipeline import RunConfig, run

    m = run(RunConfig(model="conv4", dataset="synthetic", epochs=1, finetune_epochs=0, device="cpu",
                      out=str(tmp_path / "r")))
    d = m["training_defaults"]
    assert d == {"device": "cpu", "batch_size": 128, "lr": 0.05, "finetune_lr": 0.01, "label_smoothing": 0.0,
                 "compile": False, "chosen": ["batch_size", "lr", "finetune_lr", "label_smoothing", "compile"]}
    assert m["config"]["batch_size"] == 128 and m["config"]["compile"] == "off"


def test_stream_run_killed_mid_epoch_resumes_to_the_same_result(folder, tmp_path):
    from tests.test_resume import assert_same_run, compress, leftovers

    args = ["run", "--dataset", str(folder), "--data-mode", "stream", "--workers", "2", "--model", "conv4",
            "--epochs", "2", "--finetune-epochs", "1", "--batch-size", "4", "--checkpoint-every", "2",
            "--device", "cpu", "--budget-macs", "0.5"]  # 32 training images: 8 steps an epoch
    done = compress(args + ["--out", str(tmp_path / "unbroken")])
    assert done.returncode == 0, done.stderr
    killed = compress(args + ["--out", str(tmp_path / "run")], "train-step@12")  # epoch 2 step 4; saved after step 2
    assert killed.returncode == -9, killed.stderr
    resumed = compress(args + ["--out", str(tmp_path / "run"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 2/2, step 3/8" in resumed.stdout + resumed.stderr
    assert_same_run(tmp_path / "unbroken", tmp_path / "run")
    assert leftovers(tmp_path / "run") == []
