"""Launched by tests/test_distributed.py under torchrun (or alone): one training step on a fixed
global batch, then each rank saves its weights and the step's loss to OUT/rank<R>.pt."""
import sys
from pathlib import Path

import torch
import torch.nn as nn

from compressor import data as datasets
from compressor import distributed
from compressor.train import TrainConfig, fit


def no_bn_net(num_classes: int = 10) -> nn.Module:
    """BatchNorm would see each rank's half batch; without it, two ranks equal one process."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))


def one_step(out: Path) -> None:
    device = distributed.setup(torch.device("cpu"))
    train_x, train_y, test_x, test_y, classes = datasets.synthetic(n_train=64, n_test=16)
    data = datasets.from_tensors("synthetic", train_x, train_y, test_x, test_y, classes, val_fraction=0.0)
    model = no_bn_net()
    history = fit(model, data, TrainConfig(1, batch_size=64, schedule="cosine"), device)
    torch.save({"weights": model.state_dict(), "loss": history[0]["loss"]}, out / f"rank{distributed.rank()}.pt")
    distributed.teardown()


if __name__ == "__main__":
    one_step(Path(sys.argv[1]))
