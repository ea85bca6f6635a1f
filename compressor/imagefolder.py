"""ImageFolder trees: what the in-memory and the streaming data paths share.

One reading of a tree (classes, files, the first image's format), one image decoder and its
one error, the split check and the normalisation statistics, and the shape every data set
presents to models and checkpoints. :mod:`compressor.data` (decode into memory) and
:mod:`compressor.stream` (read in DataLoader workers) both build on this module, and neither
imports the other's internals.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataShape:
    """What every data set tells the model and the checkpoint, in memory or streamed alike."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def normalization(self) -> dict:
        return {"mean": self.mean, "std": self.std}

    def example_inputs(self, batch: int = 1, device="cpu") -> torch.Tensor:
        return torch.zeros(batch, *self.input_shape, device=device)


def check_split(n_train: int, n_val: int, val_fraction: float) -> None:
    """Refuse a training set that is empty, or that the validation share would leave empty."""
    if n_train == 0:
        raise DataError("the data set has no training images")
    if n_val >= n_train:
        raise DataError(f"--val-fraction {val_fraction} holds out all {n_train} training images and leaves none "
                        "to train on; use a smaller fraction or more images")


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale, in chunks to bound memory."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in x.split(4096):
        c = chunk.double() / 255.0
        total += c.sum(dim=(0, 2, 3))
        total_sq += (c * c).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def unreadable_image(path, exc: BaseException) -> DataError:
    """One message for an image file that does not decode, in memory and stream mode alike."""
    from PIL import UnidentifiedImageError

    if isinstance(exc, FileNotFoundError):
        reason = "the file is gone"
    elif Path(path).is_file() and Path(path).stat().st_size == 0:
        reason = "the file is empty"
    elif isinstance(exc, UnidentifiedImageError):
        reason = "not an image format PIL can read"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return DataError(f"cannot decode the image {path} ({reason}); remove or replace the file")


def read_image(path, mode: str, size=None):
    """The image at ``path`` as a PIL image in ``mode`` (resized to ``size`` if given and different), fully decoded;
    a file that does not decode raises :func:`unreadable_image`'s DataError."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode)  # decodes every pixel: a truncated file fails here, not later
            if size is not None and im.size != tuple(size):
                im = im.resize(tuple(size))
            return im
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise unreadable_image(path, exc) from None


def _visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` in name order, without hidden ones (.DS_Store, macOS's ._x.png, .ipynb_checkpoints)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def listing(folder: Path):
    """(classes, train items, test items, PIL mode, first image's size); items are (path, label).

    Refuses, with one DataError each: fewer than two classes, images outside class subfolders, a class
    folder without images, test classes that training lacks, and a first image that does not decode."""
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    train_dir = folder / "train"
    classes = [d.name for d in _visible(train_dir) if d.is_dir()]
    if len(classes) < 2:
        raise DataError(f"{train_dir} needs at least two classes (one subfolder of images each), found "
                        f"{len(classes)}" + (f": {', '.join(classes)}" if classes else ""))
    index = {c: i for i, c in enumerate(classes)}

    def items(split):
        root = folder / split
        loose = [p.name for p in _visible(root) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if loose:
            raise DataError(f"{root} holds images outside class subfolders ({loose[0]}"
                            f"{f' and {len(loose) - 1} more' if len(loose) > 1 else ''}); put each image in "
                            f"{root}/<class>/")
        extra = [d.name for d in _visible(root) if d.is_dir() and d.name not in index]
        if extra:
            raise DataError(f"{root} has class folders that {train_dir} lacks: {', '.join(extra)}; every test class "
                            "must be a training class")
        found = []
        for c in classes:
            d = root / c
            if not d.is_dir():
                if d.exists():
                    raise DataError(f"{d} is a file; each class is a folder of images")
                continue  # a class without test images
            entries = _visible(d)
            images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
            if not images:
                others = [p.name for p in entries]
                why = (f"it holds only other files or folders ({len(others)}, e.g. {others[0]}; subfolders are not "
                       "read)" if others else "the class folder is empty")
                raise DataError(f"{d} holds no images ({suffixes}){';' if others else ':'} {why}; add images or "
                                "remove the folder")
            found += [(str(p), index[c]) for p in images]
        if not found:
            raise DataError(f"{root} holds no images in class subfolders")
        return found

    train, test = items("train"), items("test")
    return classes, train, test, *_first_format(train[0][0])


def _first_format(path: str):
    """PIL mode ("L" or "RGB") and size of the first training image, which every image is converted to."""
    from PIL import Image

    try:
        with Image.open(path) as first:
            first.load()
            mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
            return mode, first.size
    except Exception as exc:  # noqa: BLE001 - PIL's many failure modes
        raise unreadable_image(path, exc) from None


def decoded_bytes(n_images: int, mode: str, size: tuple[int, int]) -> int:
    """What the in-memory path would hold: every image as uint8 at the first image's size."""
    return n_images * (1 if mode == "L" else 3) * size[0] * size[1]
