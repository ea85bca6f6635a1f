import numpy as np
import pytest
import torch
from PIL import Image

from compressor import data
from compressor.errors import DataError


def test_synthetic_split_is_disjoint_and_repeatable():
    a = data.load("synthetic", val_fraction=0.25, seed=1)
    b = data.load("synthetic", val_fraction=0.25, seed=1)
    assert a.train_x.dtype == torch.uint8 and a.input_shape == [3, 32, 32]
    assert len(a.val_y) == 256 and len(a.train_y) == 768
    assert torch.equal(a.val_x, b.val_x)
    train_rows = {r.numpy().tobytes() for r in a.train_x}
    assert not any(r.numpy().tobytes() in train_rows for r in a.val_x)


def test_digits_are_28x28_grayscale_with_stats():
    d = data.load("digits")
    assert d.input_shape == [1, 28, 28] and d.num_classes == 10 and not d.flip
    assert 0 < d.mean[0] < 1 and 0 < d.std[0] < 1
    assert len(d.test_y) == 1797 // 5


def write_folder(root, classes=("cat", "dog"), n=4, mode="RGB"):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                shape = (12, 12, 3) if mode == "RGB" else (12, 12)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}.png")


def test_image_folder_is_read_and_cached(tmp_path):
    write_folder(tmp_path / "pets")
    d = data.load("pets", data_dir=tmp_path, val_fraction=0.0)
    assert d.classes == ["cat", "dog"] and d.input_shape == [3, 12, 12] and len(d.train_y) == 8 and d.flip
    first = Image.open(tmp_path / "pets" / "train" / "cat" / "0.png")
    assert torch.equal(d.train_x[0], torch.from_numpy(np.array(first)).permute(2, 0, 1))
    assert len(list((tmp_path / ".cache").glob("pets-*.pt"))) == 1
    again = data.load(str(tmp_path / "pets"), data_dir=tmp_path, val_fraction=0.0)
    assert torch.equal(again.train_x, d.train_x)


def test_grayscale_folder_has_one_channel(tmp_path):
    write_folder(tmp_path / "g", mode="L")
    assert data.load(str(tmp_path / "g"), val_fraction=0.0).input_shape == [1, 12, 12]


def test_unknown_data_set():
    with pytest.raises(DataError, match="unknown data set 'nope'"):
        data.load("nope")


def test_offline_download_names_data_dir(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*_a, **_k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(DataError, match="--data-dir"):
        data.load("cifar10", data_dir=tmp_path)


def test_random_crop_shifts_within_padding():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).view(2, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = data.random_crop(x, 2, g)
    assert out.shape == x.shape
    # every crop is a window of the zero-padded image: each non-zero value sits where the shift puts it
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        assert any(torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(5) for dx in range(5))


def test_batches_are_normalised_and_cover_the_split():
    d = data.load("synthetic", val_fraction=0.0)
    seen = 0
    for x, y in data.DeviceBatches(d, "test", 100, "cpu"):
        seen += len(y)
        assert x.dtype == torch.float32
    assert seen == len(d.test_y)
    xs = torch.cat([x for x, _ in data.DeviceBatches(d, "train", 256, "cpu")])
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1) < 0.05


def test_a_prefix_of_validation_and_test_covers_the_classes_of_class_sorted_files():
    # image folders list class by class; SMOEA scores on the first validation images and the
    # export check on the first test batch, so those must not be one or two classes
    index = torch.arange(1000)
    y = index // 100  # sorted by class
    x = torch.zeros(1000, 1, 1, 2, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = index // 256, index % 256  # each image holds its own index
    d = data.from_tensors("sorted", x, y, x, y, [str(c) for c in range(10)], val_fraction=0.2)
    assert len(d.val_y[:100].unique()) == 10 and len(d.test_y[:100].unique()) == 10
    for xs, ys in ((d.val_x, d.val_y), (d.test_x, d.test_y)):  # images and labels stay paired
        assert torch.equal((xs[:, 0, 0, 0].long() * 256 + xs[:, 0, 0, 1].long()) // 100, ys)
    assert torch.equal(d.test_y.sort().values, y)
