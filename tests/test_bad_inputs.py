"""Every bad input ends in one clear message (a CompressorError, one line from the CLI, exit code 2), never a
traceback, with the same words from the Python API and the CLI: device names, images that do not decode (in
memory and in DataLoader workers), and ImageFolder trees laid out wrong."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from compressor import data
from compressor.errors import CompressorError, DataError
from compressor.train import pick_device
from tests.test_data import write_folder

DEVICE_FORMS = "use auto, cpu, cuda or cuda:N"


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "", "cpu:abc", "cpu:0", "CPU", " cpu", "cuda:-1", "mps", "meta",
                                  None, 0])
def test_unknown_device_names_are_refused_naming_the_accepted_forms(name):
    with pytest.raises(CompressorError, match=DEVICE_FORMS) as caught:
        pick_device(name)
    assert f"unknown device {name!r}" in str(caught.value) and "\n" not in str(caught.value)


def test_accepted_device_names():
    assert pick_device("cpu") == torch.device("cpu") and pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0"):
            with pytest.raises(CompressorError, match=f"--device {name} was asked for, but this machine has no CUDA"):
                pick_device(name)


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(CompressorError, match=r"--device cuda:2 names GPU 2, but this machine has 2 \(cuda:0 to "
                                              r"cuda:1\)"):
        pick_device("cuda:2")


def _png_bytes(seed=0, fmt="PNG"):
    import io

    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(b, fmt)
    return b.getvalue()


BAD_IMAGES = {  # file name -> bytes that do not decode
    "random.png": np.random.default_rng(1).bytes(300),
    "empty.jpg": b"",
    "truncated.png": _png_bytes()[:len(_png_bytes()) // 2],
    "truncated.jpg": _png_bytes(fmt="JPEG")[:200],
}


def _load(root, mode, **kw):
    """Load ``root`` the way a run does, and in stream mode also read every split through the loader's workers."""
    d = data.load(str(root), val_fraction=kw.pop("val_fraction", 0.0), mode=mode, workers=2,
                  cache_dir=root.parent / "cache", **kw)
    if mode == "stream":
        for split in ("train", "val", "test"):
            for _ in data.batches(d, split, 4, "cpu"):
                pass
    return d


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("split", ["train", "test"])  # stream: train images read for the statistics, test in workers
@pytest.mark.parametrize("bad", sorted(BAD_IMAGES))
def test_an_image_that_does_not_decode_is_named(tmp_path, mode, split, bad):
    root = tmp_path / "pets"
    write_folder(root)
    path = root / split / "dog" / bad
    path.write_bytes(BAD_IMAGES[bad])
    with pytest.raises(DataError) as caught:
        _load(root, mode)
    message = str(caught.value)
    assert message.startswith(f"cannot decode the image {path} (") and message.endswith("remove or replace the file")
    assert "\n" not in message and "Traceback" not in message


def test_memory_mode_counts_every_bad_image(tmp_path):
    root = tmp_path / "pets"
    write_folder(root)
    (root / "train" / "cat" / "a.png").write_bytes(b"junk")
    (root / "test" / "dog" / "b.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"a\.png .*\(and 1 more image\(s\) of .* that do not decode\)"):
        _load(root, "memory")


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("classes, words", [
    (("cat",), "needs at least two classes (one subfolder of images each), found 1: cat"),
    ((), "needs at least two classes (one subfolder of images each), found 0"),
])
def test_fewer_than_two_classes_are_refused(tmp_path, mode, classes, words):
    root = tmp_path / "pets"
    write_folder(root, classes=classes)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "test").mkdir(exist_ok=True)
    with pytest.raises(DataError) as caught:
        _load(root, mode)
    assert str(caught.value) == f"{root / 'train'} {words}"


def _empty_class(root):
    (root / "train" / "bird").mkdir()
    return "train/bird holds no images (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp): the class folder is empty"


def _text_class(root):
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "labels.csv").write_text("0\n")
    return "train/bird holds no images (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp); it holds only other " \
           "files or folders (1, e.g. labels.csv; subfolders are not read)"


def _empty_test_class(root):
    for p in (root / "test" / "cat").iterdir():
        p.unlink()
    return "test/cat holds no images"


def _loose_images(root):
    Image.new("RGB", (12, 12)).save(root / "train" / "x.png")
    return f"train holds images outside class subfolders (x.png); put each image in {root / 'train'}/<class>/"


def _test_class_not_in_train(root):
    (root / "test" / "bird").mkdir()
    return f"test has class folders that {root / 'train'} lacks: bird; every test class must be a training class"


def _class_is_a_file(root):
    for p in (root / "test" / "cat").iterdir():
        p.unlink()
    (root / "test" / "cat").rmdir()
    (root / "test" / "cat").write_text("")
    return "test/cat is a file; each class is a folder of images"


def _train_is_a_file(root):
    import shutil

    shutil.rmtree(root / "train")
    (root / "train").write_text("")
    return "has no train/ and test/ folders of class subfolders (train/ is a file, not a folder)"


def _no_test(root):
    import shutil

    shutil.rmtree(root / "test")
    return "has no train/ and test/ folders of class subfolders (test/ is missing)"


@pytest.mark.parametrize("mode", ["memory", "stream"])
@pytest.mark.parametrize("spoil", [_empty_class, _text_class, _empty_test_class, _loose_images,
                                   _test_class_not_in_train, _class_is_a_file, _train_is_a_file, _no_test],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_folder_laid_out_wrong_says_how(tmp_path, mode, spoil):
    root = tmp_path / "pets"
    write_folder(root)
    words = spoil(root)
    with pytest.raises(DataError) as caught:
        _load(root, mode)
    assert words in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_hidden_files_and_folders_are_not_classes_or_images(tmp_path, mode):
    root = tmp_path / "pets"
    write_folder(root)
    (root / "train" / ".ipynb_checkpoints").mkdir()  # Jupyter's
    (root / "train" / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # macOS's AppleDouble files
    (root / "train" / ".DS_Store").write_bytes(b"\x00")
    d = _load(root, mode)
    assert d.classes == ["cat", "dog"] and len(d.train_y) == 8


def test_dataset_or_data_dir_that_is_a_file(tmp_path):
    f = tmp_path / "pets.zip"
    f.write_bytes(b"PK")
    with pytest.raises(DataError, match=f"--dataset {f} is a file; give a folder with train/ and test/"):
        data.load(str(f))
    with pytest.raises(DataError, match=f"--data-dir {f} is a file; give the folder where data sets live"):
        data.load("pets", data_dir=f)
    for name in ("", None):
        with pytest.raises(DataError, match="--dataset must name a data set or a folder"):
            data.load(name)


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_validation_share_that_leaves_no_training_images(tmp_path, mode):
    root = tmp_path / "pets"
    write_folder(root, n=1)  # 2 training images
    with pytest.raises(DataError, match="--val-fraction 0.9 holds out all 2 training images and leaves none"):
        _load(root, mode, val_fraction=0.9)
    with pytest.raises(DataError, match="holds out all 4"):
        data.from_tensors("t", torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4) % 2,
                          torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.arange(2), ["a", "b"], val_fraction=0.95)


def compress(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("COMPRESSOR_KILL_AT", None)
    return subprocess.run([sys.executable, "-m", "compressor", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _one_line_error(done, words):
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("compress: error: "), done.stderr
    assert words in done.stderr, done.stderr


RUN = ["run", "--epochs", "1", "--finetune-epochs", "0", "--batch-size", "4", "--device", "cpu"]


def test_cli_one_class_folder(tmp_path):
    root = tmp_path / "pets"
    write_folder(root, classes=("cat",))
    done = compress(RUN + ["--dataset", str(root), "--out", str(tmp_path / "run")], tmp_path)
    _one_line_error(done, f"{root / 'train'} needs at least two classes (one subfolder of images each), found 1: cat")


def test_cli_bad_image_found_by_a_stream_worker(tmp_path):
    root = tmp_path / "pets"
    write_folder(root)
    bad = root / "test" / "dog" / "random.png"  # read only in the DataLoader workers, after training
    bad.write_bytes(BAD_IMAGES["random.png"])
    done = compress(RUN + ["--dataset", str(root), "--data-mode", "stream", "--workers", "2",
                           "--out", str(tmp_path / "run")], tmp_path)
    _one_line_error(done, f"cannot decode the image {bad} (not an image format PIL can read); remove or replace")


def test_cli_unknown_device(tmp_path):
    done = compress(RUN + ["--dataset", "synthetic", "--device", "tpu", "--out", str(tmp_path / "run")], tmp_path)
    _one_line_error(done, f"unknown device 'tpu': {DEVICE_FORMS} (N = 0, 1, ...: a GPU's index)")
