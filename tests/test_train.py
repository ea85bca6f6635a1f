import torch

from compressor import data, models
from compressor.train import TrainConfig, evaluate, fit


def train_once(seed):
    d = data.load("synthetic", val_fraction=0.1)
    torch.manual_seed(seed)
    model = models.create("conv4", d.num_classes, 3)
    history = fit(model, d, TrainConfig(epochs=2, lr=0.05, batch_size=64, seed=seed), torch.device("cpu"))
    return model, d, history


def test_training_learns_and_repeats():
    a, d, history = train_once(0)
    b, _, _ = train_once(0)
    assert len(history) == 2 and history[-1]["loss"] < history[0]["loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert evaluate(a, d, "test", torch.device("cpu")) > 0.5  # 10 classes: chance is 0.1
