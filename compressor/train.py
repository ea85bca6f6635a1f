"""Train, fine-tune and evaluate on tensors kept on the device.

On a GPU: bf16 autocast (fp16 with a grad scaler where bf16 is missing) and
channels_last. On a CPU: fp32. SGD with Nesterov momentum and a one-cycle or cosine
schedule; every source of randomness is seeded so a run repeats.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .data import DeviceBatches, ImageData
from .errors import CompressorError

SCHEDULES = ("onecycle", "cosine")


@dataclass
class TrainConfig:
    epochs: int
    lr: float = 0.05
    batch_size: int = 128
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    seed: int = 0

    def as_dict(self):
        return asdict(self)


@dataclass
class TrainHooks:
    """Work a criterion adds to each training step, so that it needs no training loop of its own.

    ``penalty(progress)`` returns named loss terms (already weighted) to add to the loss;
    ``progress`` runs from 0 to 1 over the call, for warm-ups. Each term's epoch mean is
    logged. ``after_backward`` sees the gradients before the optimizer step (PSAP watches
    and masks them there), ``after_step`` runs after it.
    """

    penalty: Callable[[float], dict[str, torch.Tensor]] | None = None
    after_backward: Callable[[], None] | None = None
    after_step: Callable[[], None] | None = None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressorError("--device cuda was asked for, but this machine has no CUDA GPU (use --device cpu)")
    return device


def autocast(device: torch.device):
    """bf16 on GPUs that have it, fp16 otherwise, and plain fp32 on a CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def fit(model: nn.Module, data: ImageData, config: TrainConfig, device: torch.device, desc: str = "train",
        hooks: TrainHooks | None = None) -> list[dict]:
    """Train ``model`` on ``data``'s training split; returns one record per epoch."""
    if config.epochs <= 0:
        return []
    if config.schedule not in SCHEDULES:
        raise CompressorError(f"unknown schedule {config.schedule!r}; choose from {', '.join(SCHEDULES)}")
    torch.manual_seed(config.seed)
    prepare(model, device)
    batches = DeviceBatches(data, "train", config.batch_size, device, train=True, seed=config.seed,
                            channels_last=device.type == "cuda")
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=True,
    )
    total = config.epochs * len(batches)
    if config.schedule == "onecycle" and total >= 8:  # OneCycleLR divides by its phase lengths: too few steps fail
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total, pct_start=0.25)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    hooks = hooks or TrainHooks()
    history = []
    for epoch in range(config.epochs):
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        term_sums: dict[str, torch.Tensor] = {}
        bar = tqdm(batches, desc=f"{desc} {epoch + 1}/{config.epochs}", leave=False, dynamic_ncols=True, disable=None)
        for step, (x, y) in enumerate(bar):
            with autocast(device):
                logits = model(x)
                loss = criterion(logits, y)
                if hooks.penalty is not None:
                    terms = hooks.penalty((epoch * len(batches) + step) / total)
                    for name, term in terms.items():
                        loss = loss + term
                        term_sums[name] = term_sums.get(name, 0) + term.detach() * len(y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if hooks.after_backward is not None:
                hooks.after_backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if hooks.after_step is not None:
                hooks.after_step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if not bar.disable and step % 20 == 0:  # reading values back syncs the GPU; do it rarely
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.1%}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        record = {"epoch": epoch + 1, "loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
                  "seconds": time.perf_counter() - start}
        record.update({name: float(v) / seen for name, v in term_sums.items()})  # penalty terms, included in loss
        history.append(record)
        tqdm.write(f"{desc} epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f}, "
                   f"train acc {record['train_acc']:.2%}, {record['seconds']:.1f}s")
    return history


def evaluate(model: nn.Module, data: ImageData, split: str, device: torch.device, batch_size: int = 1024) -> float:
    """Top-1 accuracy on ``split`` ('val' or 'test')."""
    return accuracy(model, DeviceBatches(data, split, batch_size, device, channels_last=device.type == "cuda"), device)


@torch.no_grad()
def accuracy(model: nn.Module, batches: DeviceBatches, device: torch.device) -> float:
    """Top-1 accuracy over ``batches``; reuse one DeviceBatches to evaluate many times without re-copying data."""
    prepare(model, device)
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in batches:
        with autocast(device):
            correct += (model(x).argmax(1) == y).sum()
    n = len(batches.y)
    return correct.item() / n if n else float("nan")
