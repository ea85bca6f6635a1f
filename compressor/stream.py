"""Image folders read from disk in DataLoader workers, for sets too big to decode into memory.

:class:`StreamData` has :class:`compressor.data.ImageData`'s interface (name, classes,
input_shape, num_classes, normalization, example_inputs, and label tensors ``train_y``,
``val_y``, ``test_y`` for counting) but keeps file lists instead of pixels. Its
:class:`StreamBatches` has :class:`compressor.data.DeviceBatches`'s: ``epoch_order()``,
``iterate(order, first_batch)``, ``generator``, ``len()``, ``y``.

The split rule is the in-memory one (``from_tensors``): a seeded permutation of the training
files holds out the validation share, the rest stays in folder order, and validation and test
files keep a seeded random order, so that any prefix is a fair sample of every class.

Transforms (PIL, in the workers; the uint8 result is normalised on the device):
  shorter side of the first training image <= 64 px: native size (other sizes are resized to
      it, as the in-memory path does); training adds a random crop after zero padding of 1/8
      of the width and, for colour images, a horizontal flip; evaluation is the plain image.
  larger: crop = min(224, shorter side), resize = round(crop * 256 / 224); training
      RandomResizedCrop(crop) + RandomHorizontalFlip, evaluation Resize(resize) + CenterCrop(crop).
Then ToTensor + Normalize with the training split's mean/std, computed on up to
``STATS_SAMPLE`` training images (seeded sample) through the evaluation transform.

Randomness: ``epoch_order()`` draws the permutation and one seed per image from
``generator``; a worker seeds each image's transform with its seed, so an epoch's batches
depend on neither the number of workers nor an interruption (a resumed epoch with the saved
order gives the same batches). Under torchrun each rank loads its slice of every global batch.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .errors import DataError
from .imagefolder import DataShape, channel_stats, check_split, listing, read_image

SMALL_SIDE = 64  # images up to this shorter side keep their size
CROP, RESIZE = 224, 256  # torchvision's ImageNet sizes, for larger images
STATS_SAMPLE = 1024  # training images that estimate the normalisation
MEMORY_LIMIT_GIB = 4.0  # --data-mode auto streams when the decoded set would exceed this


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def open_folder(name: str, folder: Path, val_fraction: float, seed: int, workers: int | None = None,
                listed=None) -> StreamData:

    classes, train, test, mode, size = listed or listing(folder)
    n_val = round(len(train) * val_fraction)
    check_split(len(train), n_val, val_fraction)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val].tolist(), order[n_val:].sort().values.tolist()
    test_idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed)).tolist()
    side = min(size)
    if side <= SMALL_SIDE:
        native, crop, resize = size, None, None
    else:
        native, crop = None, min(CROP, side)
        resize = round(crop * RESIZE / CROP)
    data = StreamData(name=name, root=str(folder), mode=mode, classes=list(classes),
                      train_items=[train[i] for i in train_idx], val_items=[train[i] for i in val_idx],
                      test_items=[test[i] for i in test_idx], native=native, crop=crop, resize=resize,
                      mean=[], std=[], flip=mode == "RGB", workers=default_workers() if workers is None else workers)
    data.mean, data.std = data.sample_stats(seed)
    return data


@dataclass
class StreamData(DataShape):
    name: str
    root: str
    mode: str  # PIL mode the images are converted to: "RGB" or "L"
    classes: list[str]
    train_items: list[tuple[str, int]]
    val_items: list[tuple[str, int]]
    test_items: list[tuple[str, int]]
    native: tuple[int, int] | None  # (width, height) kept as is, for small images
    crop: int | None  # for larger ones
    resize: int | None
    mean: list[float]
    std: list[float]
    flip: bool
    workers: int

    @property
    def input_shape(self) -> list[int]:
        c = 1 if self.mode == "L" else 3
        return [c, self.native[1], self.native[0]] if self.native else [c, self.crop, self.crop]

    def _labels(self, split):
        return torch.tensor([y for _, y in getattr(self, f"{split}_items")], dtype=torch.int64)

    @property
    def train_y(self) -> torch.Tensor:
        return self._labels("train")

    @property
    def val_y(self) -> torch.Tensor:
        return self._labels("val")

    @property
    def test_y(self) -> torch.Tensor:
        return self._labels("test")

    def val_subset(self, n: int) -> StreamData:
        """The first ``n`` validation images (a fair sample: the order is seeded random)."""
        return replace(self, val_items=self.val_items[:n])

    def transform(self, train: bool):
        import torchvision.transforms as T

        if self.native:
            if not train:
                return None
            w, h = self.native
            steps = [T.RandomCrop((h, w), padding=max(1, w // 8))]
        elif train:
            steps = [T.RandomResizedCrop(self.crop)]
        else:
            return T.Compose([T.Resize(self.resize), T.CenterCrop(self.crop)])
        if self.flip:
            steps.append(T.RandomHorizontalFlip())
        return T.Compose(steps)

    def files(self, split: str, train: bool, report: bool = False) -> Files:
        return Files(getattr(self, f"{split}_items"), self.mode, self.native, self.transform(train), report)

    def sample_stats(self, seed: int) -> tuple[list[float], list[float]]:
        n = len(self.train_items)
        pick = range(n) if n <= STATS_SAMPLE else \
            torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE].sort().values.tolist()
        files = self.files("train", train=False)
        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
            images = list(pool.map(lambda i: files[(i, None)][0], pick))
        return channel_stats(torch.stack(images))

    def batches(self, split: str, batch_size: int, device, train: bool = False, seed: int = 0,
                drop_last: bool = False, split_ranks: bool = False) -> StreamBatches:
        return StreamBatches(self, split, batch_size, device, train, seed, drop_last, split_ranks)


class Unreadable:
    """What a DataLoader worker hands back for a batch with a file that does not decode: the message, as data.

    An exception raised in a worker reaches the training process re-made with the worker's traceback in its
    message; this keeps the message one line, and the training process raises it (StreamBatches.iterate)."""

    def __init__(self, message: str):
        self.message = message


def collate(items):
    """torch's default_collate, or the first :class:`Unreadable` among ``items``."""
    for item in items:
        if isinstance(item, Unreadable):
            return item
    return torch.utils.data.default_collate(items)


class Files(torch.utils.data.Dataset):
    """Decodes item ``(index, seed)``: the image as uint8 CHW and its label; ``seed`` seeds the transform.

    A file that does not decode raises DataError naming it, or with ``report`` is returned as :class:`Unreadable`
    (for DataLoader workers)."""

    def __init__(self, items, mode, native, transform, report: bool = False):
        self.items, self.mode, self.native, self.transform = items, mode, native, transform
        self.report = report

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        try:
            return self._decode(key)
        except DataError as exc:
            if self.report:
                return Unreadable(str(exc))
            raise

    def _decode(self, key):
        i, seed = key
        path, label = self.items[i]
        im = read_image(path, self.mode, self.native)  # resized to the native size as the in-memory path does
        if self.transform is not None:
            # torchvision's random transforms draw from torch's global CPU generator: seed it for this image,
            # and give it back as it was (with --workers 0 this runs in the training process)
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.default_generator.manual_seed(seed)
                im = self.transform(im)
        a = np.asarray(im, dtype=np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(a)), label


class OrderSampler(torch.utils.data.Sampler):
    """Batches of ``(index, seed)`` keys from a set order, starting at a batch index; with ``split_ranks``
    this rank's slice of each global batch (the rule DeviceBatches follows)."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, split_ranks: bool):
        self.n, self.batch_size, self.split_ranks = n, batch_size, split_ranks
        self.drop_last = drop_last and n >= batch_size
        self.order, self.first = None, 0

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        return self._batches(self.order, self.first)  # the order set when the iteration starts

    def _batches(self, order, first):
        for b in range(first, len(self)):
            start = b * self.batch_size
            stop = min(start + self.batch_size, self.n)
            if order is None:
                keys = [(i, None) for i in range(start, stop)]
            else:
                keys = list(zip(order[0, start:stop].tolist(), order[1, start:stop].tolist()))
            if self.split_ranks:
                keys = keys[distributed.shard(len(keys))]
            yield keys


class StreamBatches:
    """Normalised float batches of a :class:`StreamData` split, decoded by DataLoader workers."""

    def __init__(self, data: StreamData, split: str, batch_size: int, device, train: bool = False, seed: int = 0,
                 drop_last: bool = False, split_ranks: bool = False):
        self.device = torch.device(device)
        self.order_device = torch.device("cpu")
        self.y = data._labels(split)
        self.batch_size, self.train, self.split_ranks = batch_size, train, split_ranks
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = OrderSampler(len(self.y), batch_size, drop_last, split_ranks)
        cuda = self.device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            data.files(split, train, report=True), batch_sampler=self.sampler, num_workers=data.workers,
            pin_memory=cuda, persistent_workers=data.workers > 0, collate_fn=collate)
        self.mean = torch.tensor(data.mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=self.device).view(1, -1, 1, 1)
        self.channels_last = cuda

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        return self.iterate(self.epoch_order())

    def epoch_order(self) -> torch.Tensor | None:
        """[2, N]: this epoch's permutation and one transform seed per image (None: in order, no augmentation)."""
        if not self.train:
            return None
        n = len(self.y)
        return torch.stack([torch.randperm(n, generator=self.generator),
                            torch.randint(0, 2**62, (n,), generator=self.generator)])

    def iterate(self, order: torch.Tensor | None, first_batch: int = 0):
        self.sampler.order, self.sampler.first = (order.cpu() if order is not None else None), first_batch
        for batch in self.loader:
            if isinstance(batch, Unreadable):  # a file that does not decode, found by a worker: its one-line message
                raise DataError(batch.message)
            x, y = batch
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x = (x.float() / 255.0 - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
