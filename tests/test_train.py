import pytest
import torch

from compressor import data, models
from compressor.errors import CompressorError
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


def test_fits_sliced_from_one_schedule_follow_it(monkeypatch):
    """An equal-epochs run trains a criterion's steps and the fine-tuning as slices of one cosine:
    the learning rates of the slices, in a row, are the whole schedule's, with no restart between them."""
    d = data.load("synthetic", val_fraction=0.1)
    seen = []
    step = torch.optim.SGD.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", recording)

    def lrs(**kwargs):
        seen.clear()
        fit(models.create("conv4", d.num_classes, 3), d, TrainConfig(lr=0.05, batch_size=64, schedule="cosine",
                                                                      **kwargs), torch.device("cpu"))
        return list(seen)

    whole = lrs(epochs=3)
    sliced = lrs(epochs=1, schedule_epochs=3) + lrs(epochs=2, schedule_epochs=3, schedule_start=1)
    assert sliced == pytest.approx(whole)
    restarted = lrs(epochs=1) + lrs(epochs=2)
    assert restarted[len(restarted) // 3] == pytest.approx(0.05)  # each fit alone starts at the full rate again
    with pytest.raises(CompressorError, match="past the schedule's 3"):
        TrainConfig(epochs=2, schedule="cosine", schedule_epochs=3, schedule_start=2)
