"""Image data sets as uint8 tensors, decoded once, cached, and augmented on the device.

Small image sets fit in memory. A DataLoader that decodes PIL images per step cannot
keep a GPU busy at CIFAR size, so every source becomes four tensors (train/test images
as uint8 NCHW, labels as int64), cached on disk after the first decode, moved to the
device once, and augmented there with tensor ops (random crop with padding, flip).

Sources, tried in this order for ``--dataset NAME``:
  ``digits``     scikit-learn's bundled 8x8 digits, resized to 28x28 (works offline)
  ``synthetic``  class-dependent random patterns, for tests and smoke runs
  a folder, or DATA_DIR/NAME, holding ``train/`` and ``test/`` ImageFolder trees
  ``mnist``, ``cifar10``, ``cifar100`` through torchvision's downloaders into DATA_DIR
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .errors import DataError
from .files import atomic_path
from .imagefolder import (  # noqa: F401  (IMAGE_SUFFIXES, read_image, unreadable_image: re-exported)
    IMAGE_SUFFIXES,
    DataShape,
    channel_stats,
    check_split,
    decoded_bytes,
    listing,
    read_image,
    unreadable_image,
)

TORCHVISION_SETS = ("mnist", "cifar10", "cifar100")
DATA_MODES = ("auto", "memory", "stream")



@dataclass
class ImageData(DataShape):
    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    flip: bool  # horizontal flips make sense for natural images, not for digits

    @property
    def input_shape(self) -> list[int]:
        return list(self.train_x.shape[1:])



def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    mode: str = "memory",
    workers: int | None = None,
):
    """Load data set ``name`` with a validation split carved from its training set.

    The split is fixed by ``seed``; criteria that score candidates use it, never the test set.
    ``mode``: ``memory`` decodes everything into an :class:`ImageData`; ``stream`` reads an
    ImageFolder tree from disk in ``workers`` DataLoader processes (a ``compressor.stream.StreamData``);
    ``auto`` streams a folder whose decoded images would exceed ``stream.MEMORY_LIMIT_GIB``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if mode not in DATA_MODES:
        raise DataError(f"--data-mode must be one of {', '.join(DATA_MODES)}, not {mode!r}")
    if isinstance(name, os.PathLike):  # a folder given as a Path
        name = str(name)
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"--dataset must name a data set or a folder, not {name!r}")
    if data_dir and Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir} is a file; give the folder where data sets live (or download to)")
    data_dir = Path(data_dir) if data_dir else Path("data")
    if mode != "memory":
        from . import stream

        folder = _image_folder_root(name, data_dir) if name not in ("digits", "synthetic") else None
        if folder is None and mode == "stream":
            raise DataError(f"--data-mode stream reads ImageFolder trees (train/ and test/); {name!r} is not one "
                            "(use --data-mode auto or memory)")
        if folder is not None:
            listed = listing(folder)
            size = decoded_bytes(len(listed[1]) + len(listed[2]), listed[3], listed[4])
            if mode == "stream" or size > stream.MEMORY_LIMIT_GIB * 2**30:
                return stream.open_folder(name, folder, val_fraction, seed, workers, listed)
    (train_x, train_y, test_x, test_y, classes), flip = _decoded(name, data_dir, cache_dir)
    return from_tensors(name, train_x, train_y, test_x, test_y, classes, val_fraction, seed, flip)


def from_tensors(name: str, train_x, train_y, test_x, test_y, classes, val_fraction: float = 0.1, seed: int = 0,
                 flip: bool = False) -> ImageData:
    """An :class:`ImageData` from uint8 NCHW tensors already in memory (your own data, or a test's).

    Validation and test images are kept in a seeded random order, not in the class order
    that image folders give, so that any prefix of them (SMOEA's ``--search-samples``, the
    export check's batch) is a fair sample of every class.
    """
    if not 0.0 <= val_fraction < 1.0:  # NaN fails this too
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(len(train_y) * val_fraction))
    check_split(len(train_y), n_val, val_fraction)
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val], order[n_val:].sort().values
    test_idx = torch.randperm(len(test_y), generator=torch.Generator().manual_seed(seed))
    tx = train_x[train_idx]
    mean, std = channel_stats(tx)
    return ImageData(name, tx, train_y[train_idx], train_x[val_idx], train_y[val_idx], test_x[test_idx],
                     test_y[test_idx], list(classes), mean, std, flip)


def _decoded(name: str, data_dir: Path, cache_dir):
    if name == "digits":
        return _digits(), False
    if name == "synthetic":
        return synthetic(), False
    folder = _image_folder_root(name, data_dir)
    if folder is not None:
        tensors = _cached(folder, cache_dir or data_dir / ".cache", _read_image_folder)
        return tensors, tensors[0].shape[1] == 3
    if name in TORCHVISION_SETS:
        return _torchvision(name, data_dir), name != "mnist"
    raise DataError(
        f"unknown data set {name!r}: use digits, synthetic, {', '.join(TORCHVISION_SETS)}, a folder with "
        f"train/ and test/ ImageFolder trees, or a name that exists under --data-dir (now {data_dir})"
    )


def _image_folder_root(name: str, data_dir: Path) -> Path | None:
    """The folder holding ``train/`` and ``test/`` for ``name`` (a path, or a name under ``data_dir``); None if
    ``name`` names no folder. A folder or file that is there but is no ImageFolder data set is refused, saying why."""
    candidates = (Path(name), data_dir / name)
    for candidate in candidates:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    for candidate in candidates if name not in TORCHVISION_SETS else candidates[:1]:
        if candidate.is_dir():
            wrong = [f"{split}/ is {'a file, not a folder' if (candidate / split).exists() else 'missing'}"
                     for split in ("train", "test") if not (candidate / split).is_dir()]
            raise DataError(f"{candidate} has no train/ and test/ folders of class subfolders ({', '.join(wrong)}); "
                            "an ImageFolder data set is <folder>/train/<class>/<image> and "
                            "<folder>/test/<class>/<image>")
        if candidate.is_file() and name not in TORCHVISION_SETS:
            raise DataError(f"--dataset {candidate} is a file; give a folder with train/ and test/ ImageFolder trees "
                            f"or a data set name (digits, synthetic, {', '.join(TORCHVISION_SETS)})")
    return None


def _cached(folder: Path, cache_dir: Path, reader):
    """Decode ``folder`` once; later runs read the tensors from ``cache_dir``."""
    files = sorted(str(p.relative_to(folder)) + f":{p.stat().st_size}" for p in folder.rglob("*") if p.is_file())
    key = hashlib.sha256((str(folder.resolve()) + "\n" + "\n".join(files)).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"{folder.name}-{key}.pt"
    if cache.is_file():
        try:
            d = torch.load(cache, weights_only=True)
            return d["train_x"], d["train_y"], d["test_x"], d["test_y"], d["classes"]
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt, not trusted
            pass
    train_x, train_y, test_x, test_y, classes = reader(folder)
    try:
        with atomic_path(cache) as tmp:
            torch.save(
                {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": classes}, tmp
            )
    except OSError:
        pass  # a read-only data directory just means no cache
    return train_x, train_y, test_x, test_y, classes


def _read_image_folder(folder: Path):
    classes, train, test, mode, size = listing(folder)  # one reading of an ImageFolder tree for both paths

    def decode(item):
        try:
            a = np.asarray(read_image(item[0], mode, size), dtype=np.uint8)
        except DataError as exc:
            return exc
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        arrays = [list(pool.map(decode, items, chunksize=256)) for items in (train, test)]
    failed = [a for split in arrays for a in split if isinstance(a, DataError)]
    if failed:  # every bad file counted, the first named: one run finds them all
        more = f" (and {len(failed) - 1} more image(s) of {folder} that do not decode)" if len(failed) > 1 else ""
        raise DataError(f"{failed[0]}{more}")

    def stack(decoded, items):
        return torch.from_numpy(np.stack(decoded)), torch.tensor([y for _, y in items], dtype=torch.int64)

    return (*stack(arrays[0], train), *stack(arrays[1], test), classes)


def _torchvision(name: str, data_dir: Path):
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    try:
        train, test = cls(str(data_dir), train=True, download=True), cls(str(data_dir), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - offline, partial download, ...
        raise DataError(
            f"could not get {name} through torchvision into {data_dir} ({type(exc).__name__}: {exc}). "
            f"Offline, pass --data-dir DIR where DIR/{name}/train and DIR/{name}/test are ImageFolder trees "
            "(or DIR holds torchvision's files)"
        ) from None

    def tensors(ds):
        x = torch.as_tensor(np.asarray(ds.data))
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    return (*tensors(train), *tensors(test), list(train.classes))


def _digits():
    """scikit-learn's 1,797 bundled 8x8 digits, bilinearly resized to 28x28; the last 20% are the test set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.tensor(d.target, dtype=torch.int64)
    n_test = len(y) // 5
    return x[:-n_test], y[:-n_test], x[-n_test:], y[-n_test:], [str(i) for i in range(10)]


def synthetic(num_classes: int = 10, shape=(3, 32, 32), n_train: int = 1024, n_test: int = 256, seed: int = 0):
    """Each class is a fixed smooth random pattern plus noise: learnable, so accuracy means something."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    templates = F.interpolate(torch.rand(num_classes, c, 4, 4, generator=g), size=(h, w), mode="bilinear")

    def draw(n):
        y = torch.arange(n) % num_classes
        x = templates[y] + 0.25 * torch.randn(n, c, h, w, generator=g)
        return (x.clamp(0, 1) * 255).to(torch.uint8), y

    return (*draw(n_train), *draw(n_test), [f"class{i}" for i in range(num_classes)])


class DeviceBatches:
    """Batches of normalised float images from uint8 tensors kept on ``device``.

    Augmentation (random crop with zero padding of 1/8 of the side, horizontal flip for
    natural images) runs as tensor ops on the device, seeded by ``seed``.
    """

    def __init__(self, data: ImageData, split: str, batch_size: int, device, train: bool = False, seed: int = 0,
                 channels_last: bool = False, split_ranks: bool = False, drop_last: bool = False):
        self.x = getattr(data, f"{split}_x").to(device, non_blocking=True)
        self.y = getattr(data, f"{split}_y").to(device, non_blocking=True)
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.batch_size, self.train, self.flip = batch_size, train, data.flip and train
        self.padding = max(1, self.x.shape[-1] // 8) if train else 0
        self.channels_last = channels_last
        self.split_ranks = split_ranks  # each torchrun rank keeps its share of every global batch
        self.generator = torch.Generator(device=self.x.device).manual_seed(seed)
        self.order_device = self.x.device  # where epoch_order()'s tensor lives (a resumed one goes back there)
        self.drop_last = drop_last and len(self.y) >= batch_size  # no partial last batch (one shape for compile)

    def __len__(self):
        if self.drop_last:
            return len(self.y) // self.batch_size
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        return self.iterate(self.epoch_order())

    def epoch_order(self) -> torch.Tensor | None:
        """This epoch's shuffled order (None: in order, for evaluation); draws from the generator."""
        return torch.randperm(len(self.y), device=self.x.device, generator=self.generator) if self.train else None

    def iterate(self, order: torch.Tensor | None, first_batch: int = 0):
        """Batches in ``order`` from batch ``first_batch`` on: a resumed epoch continues where it stopped
        (with the generator's state restored, its crops and flips are the unbroken epoch's)."""
        n = len(self) * self.batch_size if self.drop_last else len(self.y)
        for start in range(first_batch * self.batch_size, n, self.batch_size):
            idx = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            x, y = self.x[idx], self.y[idx]
            if self.padding:
                x = random_crop(x, self.padding, self.generator)
            if self.flip:
                x = random_flip(x, self.generator)
            if self.split_ranks:  # after the random draws for the whole batch: the ranks together see one batch
                part = distributed.shard(len(y))
                x, y = x[part], y[part]
            x = (x.float() / 255.0 - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


def batches(data, split: str, batch_size: int, device, train: bool = False, seed: int = 0,
            drop_last: bool = False, split_ranks: bool | None = None):
    """Batches of ``split`` for training (``train``: shuffled, augmented) or evaluation, whatever ``data`` is:
    a :class:`DeviceBatches` for in-memory data, a loader-backed ``StreamBatches`` for streamed data.
    Both have ``epoch_order()``, ``iterate(order, first_batch)``, ``generator``, ``len()``, ``y``,
    ``split_ranks`` and ``order_device``. ``split_ranks`` (default: when training under torchrun):
    each rank gets its slice of every global batch."""
    device = torch.device(device)
    if split_ranks is None:
        split_ranks = train and distributed.active()
    if not isinstance(data, ImageData) and hasattr(data, "batches"):
        return data.batches(split, batch_size, device, train=train, seed=seed, drop_last=drop_last,
                            split_ranks=split_ranks)
    return DeviceBatches(data, split, batch_size, device, train=train, seed=seed,
                         channels_last=device.type == "cuda", split_ranks=split_ranks, drop_last=drop_last)


def val_subset(data, n: int):
    """``data`` with only its first ``n`` validation images (they are in a seeded random order)."""
    if hasattr(data, "val_subset"):
        return data.val_subset(n)
    from dataclasses import replace

    return replace(data, val_x=data.val_x[:n], val_y=data.val_y[:n])


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop of an (N, C, H, W) batch after zero padding, by one gather."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=generator)
    rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
    cropped = padded.gather(2, rows)
    cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return cropped.gather(3, cols)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
