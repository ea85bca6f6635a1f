"""Train, fine-tune and evaluate on tensors kept on the device.

On a GPU: bf16 autocast (fp16 with a grad scaler where bf16 is missing) and
channels_last. On a CPU: fp32. SGD with Nesterov momentum and a one-cycle or cosine
schedule; every source of randomness is seeded so a run repeats.
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import data as datasets
from . import distributed, resume
from .data import ImageData
from .errors import CompressorError
from .files import failpoint
from .resume import StageState

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
    compile: bool = False  # torch.compile the training model (dynamic=False; the last partial batch is dropped)
    distill: float = 0.0  # weight of the teacher's soft targets in the loss (0: plain cross-entropy)
    temperature: float = 4.0  # softens teacher and student logits in the distillation term

    def __post_init__(self):
        """Refuse numbers training cannot use (NaN and inf too) with one CompressorError, before any data is touched."""
        from .checks import choice, number

        number("TrainConfig.epochs", self.epochs, integer=True, low=0)
        number("TrainConfig.lr", self.lr, low=0, low_open=True)
        number("TrainConfig.batch_size", self.batch_size, integer=True, low=1)
        number("TrainConfig.weight_decay", self.weight_decay, low=0)
        # Nesterov needs > 0
        number("TrainConfig.momentum", self.momentum, low=0, high=1, low_open=True, high_open=True)
        number("TrainConfig.label_smoothing", self.label_smoothing, low=0, high=1, high_open=True)
        number("TrainConfig.seed", self.seed, integer=True, low=0)
        number("TrainConfig.distill", self.distill, low=0, high=1)
        number("TrainConfig.temperature", self.temperature, low=0, low_open=True)
        choice("TrainConfig.schedule", self.schedule, SCHEDULES)
        if not isinstance(self.compile, bool):
            raise CompressorError(f"TrainConfig.compile must be True or False, not {self.compile!r}")

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
    stateful: list = field(default_factory=list)  # objects with state_dict()/load_state_dict(), saved with progress


CPU_BATCH, CPU_LR, CPU_FINETUNE_LR = 128, 0.05, 0.01


def device_defaults(device_type: str, batch_size: int | None = None) -> dict:
    """Training settings by device. CPU: today's (batch 128, lr 0.05, fine-tuning lr 0.01, no
    compile, no smoothing). CUDA: batch 512, the learning rates scaled linearly with the batch
    from the CPU ones at 128 (a user's ``batch_size`` scales them too), torch.compile, smoothing 0.1."""
    if device_type == "cuda":
        batch = 512 if batch_size is None else batch_size
        return {"batch_size": batch, "lr": CPU_LR * batch / CPU_BATCH,
                "finetune_lr": CPU_FINETUNE_LR * batch / CPU_BATCH, "label_smoothing": 0.1, "compile": True}
    return {"batch_size": CPU_BATCH, "lr": CPU_LR, "finetune_lr": CPU_FINETUNE_LR, "label_smoothing": 0.0,
            "compile": False}


def resolve_defaults(device_type: str, given: dict) -> tuple[dict, list[str]]:
    """``given`` (name -> value, None or for compile "auto" = choose by device) with every open value
    chosen for ``device_type``; also the names that were chosen. Explicit values win."""
    compile_ = given.get("compile")
    compile_ = {"on": True, "off": False, "auto": None}.get(compile_, compile_)
    given = {**given, "compile": compile_}
    chosen = device_defaults(device_type, given.get("batch_size"))
    names = [k for k in chosen if given.get(k) is None]
    return {k: chosen[k] if given.get(k) is None else given[k] for k in chosen}, names


_COMPILED: list = []  # the last (net, shapes, compiled module): one entry, so no model is kept alive for long


def compiled(model: nn.Module, net: nn.Module) -> nn.Module:
    """``net`` (the model, or DDP around it) under torch.compile (dynamic=False), reused while the same
    net keeps the same shapes: successive fits of one model compile once, a pruned model once more."""
    shapes = tuple(tuple(t.shape) for t in model.state_dict().values())
    if _COMPILED and _COMPILED[0][0] is net and _COMPILED[0][1] == shapes:
        return _COMPILED[0][2]
    fn = torch.compile(net, dynamic=False)
    _COMPILED[:] = [(net, shapes, fn)]
    return fn


DEVICE_FORMS = "auto, cpu, cuda or cuda:N (N = 0, 1, ...: a GPU's index)"


def pick_device(name: str = "auto") -> torch.device:
    """The device ``name`` asks for: ``auto`` (CUDA if present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Anything else, a CUDA device on a machine without one and a GPU index the machine does not have are
    refused with one CompressorError (torch's own errors name device types this project does not support)."""
    if isinstance(name, torch.device):  # a device already made (Python callers): its written form
        name = str(name)
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise CompressorError(f"unknown device {name!r}: use {DEVICE_FORMS}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressorError(f"--device {name} was asked for, but this machine has no CUDA GPU (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise CompressorError(f"--device {name} names GPU {device.index}, but this machine has {count} "
                              f"(cuda:0 to cuda:{count - 1})")
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


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target term: KL(teacher || student) at ``temperature``, times T^2 so that its
    gradients keep their size as T changes."""
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student.float() / t, 1),
                                nn.functional.log_softmax(teacher.float() / t, 1),
                                reduction="batchmean", log_target=True) * (t * t)


def fit(model: nn.Module, data: ImageData, config: TrainConfig, device: torch.device, desc: str = "train",
        hooks: TrainHooks | None = None, state: StageState | None = None,
        teacher: nn.Module | None = None) -> list[dict]:
    """Train ``model`` on ``data``'s training split; returns one record per epoch.

    With ``config.distill`` > 0, the loss is ``(1 - distill) * cross-entropy + distill * soft-target
    term`` against ``teacher``'s logits (the teacher stays frozen, in eval mode).

    With ``state``, progress is saved at the end of every epoch (and every
    ``state.every_steps`` steps), and a saved state is continued from: a finished stage
    loads its final weights and returns at once (see ``compressor.resume``).
    """
    if config.epochs <= 0:
        return []
    if config.schedule not in SCHEDULES:
        raise CompressorError(f"unknown schedule {config.schedule!r}; choose from {', '.join(SCHEDULES)}")
    if config.distill > 0 and teacher is None:
        raise CompressorError("distillation (TrainConfig.distill > 0) needs a teacher model")
    if config.distill > 0:
        teacher = prepare(teacher, device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    torch.manual_seed(config.seed)
    prepare(model, device)
    batches = datasets.batches(data, "train", config.batch_size, device, train=True, seed=config.seed,
                               drop_last=config.compile)  # one batch shape: the compiled graph is built once
    net = distributed.wrap(model, device)  # DDP averages the gradients of the ranks' shares of each batch
    if config.compile:
        net = compiled(model, net)
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
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    hooks = hooks or TrainHooks()
    history: list[dict] = []
    first_epoch, first_step, order, sums = 0, 0, None, None
    writer = resume.Writer()
    fingerprint = {"config": config.as_dict(), "batches": len(batches),
                   "shapes": [list(t.shape) for t in model.state_dict().values()]}

    def snapshot(epoch, step, order, sums):
        return {"format": resume.FORMAT, "fingerprint": fingerprint, "epoch": epoch, "step": step,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": resume.rng_state(), "data": batches.generator.get_state(),
                "order": order, "sums": sums, "history": history,
                "hooks": [h.state_dict() for h in hooks.stateful]}

    saved = state.load() if state is not None else None
    if saved is not None:
        if saved["fingerprint"] != fingerprint:
            raise CompressorError(f"{state.path} was saved by other training settings or another model; "
                                  "resume with the run's own settings, or start the run afresh")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        for h, h_state in zip(hooks.stateful, saved["hooks"]):
            h.load_state_dict(h_state)
        resume.set_rng_state(saved["rng"])
        batches.generator.set_state(saved["data"])
        history = list(saved["history"])
        first_epoch, first_step = saved["epoch"], saved["step"]
        order = saved["order"].to(batches.order_device) if saved["order"] is not None else None
        sums = saved["sums"]
        if first_epoch >= config.epochs:
            tqdm.write(f"{desc}: finished before the interruption; its saved result is loaded")
            return history
        tqdm.write(f"{desc}: resuming at epoch {first_epoch + 1}/{config.epochs}"
                   + (f", step {first_step + 1}/{len(batches)}" if first_step else ""))
    every = state.every_steps if state is not None else 0
    for epoch in range(first_epoch, config.epochs):
        model.train()
        start = time.perf_counter()
        if first_step and epoch == first_epoch:  # the interrupted epoch: its order and running sums
            loss_sum, correct, seen, term_sums = (sums["loss"].to(device), sums["correct"].to(device), sums["seen"],
                                                  {k: v.to(device) for k, v in sums["terms"].items()})
        else:
            first_step, order = 0, batches.epoch_order()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen, term_sums = 0, {}
        bar = tqdm(batches.iterate(order, first_step), desc=f"{desc} {epoch + 1}/{config.epochs}", leave=False,
                   dynamic_ncols=True, disable=None, total=len(batches), initial=first_step)
        for step, (x, y) in enumerate(bar, start=first_step):
            with autocast(device):
                logits = net(x)
                loss = criterion(logits, y)
                if config.distill > 0:
                    with torch.no_grad():
                        soft = teacher(x)
                    kd = distillation_loss(logits, soft, config.temperature)
                    loss = (1 - config.distill) * loss + config.distill * kd
                    term_sums["distill"] = term_sums.get("distill", 0) + kd.detach() * len(y)
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
            failpoint("train-step")
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            if not bar.disable and step % 20 == 0:  # reading values back syncs the GPU; do it rarely
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.1%}")
            if every and distributed.is_main() and (step + 1) % every == 0 and step + 1 < len(batches):
                writer.save(state.path, snapshot(epoch, step + 1, order, {
                    "loss": loss_sum, "correct": correct, "seen": seen, "terms": term_sums}))
        first_step = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        if distributed.active():  # the epoch's figures over every rank's share
            loss_sum, correct = distributed.all_sum(loss_sum), distributed.all_sum(correct)
            term_sums = {k: distributed.all_sum(torch.as_tensor(v, device=device)) for k, v in term_sums.items()}
            seen = int(distributed.all_sum(torch.tensor(seen, device=device)))
        record = {"epoch": epoch + 1, "loss": loss_sum.item() / seen, "train_acc": correct.item() / seen,
                  "seconds": time.perf_counter() - start}
        record.update({name: float(v) / seen for name, v in term_sums.items()})  # penalty terms, included in loss
        history.append(record)
        line = (f"{desc} epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f}, "
                f"train acc {record['train_acc']:.2%}, {record['seconds']:.1f}s")
        if state is not None and distributed.is_main():  # every rank holds the same weights; rank 0 writes
            # Reported means kept: the line is printed once the epoch's state is on disk (by the writer's thread,
            # while the next epoch trains), so a run killed after the line resumes at the next epoch.
            writer.save(state.path, snapshot(epoch + 1, 0, None, None),
                        committed=lambda line=line: report(line + ", saved"))
        else:
            report(line)
    writer.flush()  # the last epoch's line is out before fit returns
    return history


def report(line: str) -> None:
    """Print an epoch's line now (to a log file or pipe too, not when a buffer fills)."""
    tqdm.write(line)
    sys.stdout.flush()
    failpoint("epoch-line")  # a test kills the run here: the epoch just reported must not be trained again


def evaluate(model: nn.Module, data: ImageData, split: str, device: torch.device, batch_size: int = 1024) -> float:
    """Top-1 accuracy on ``split`` ('val' or 'test')."""
    return accuracy(model, datasets.batches(data, split, batch_size, device, split_ranks=distributed.active()), device)


@torch.no_grad()
def accuracy(model: nn.Module, batches, device: torch.device, local: bool = False) -> float:
    """Top-1 accuracy over ``batches``; reuse one DeviceBatches to evaluate many times without re-copying data.

    ``local``: this rank scores every image itself (when the ranks evaluate different things)."""
    prepare(model, device)
    model.eval()
    correct = torch.zeros((), device=device, dtype=torch.long)
    for x, y in batches:
        # under torchrun each rank scores its share (batches with split_ranks hold only it); the counts are summed
        part = slice(None) if local or getattr(batches, "split_ranks", False) else distributed.shard(len(y))
        with autocast(device):
            correct += (model(x[part]).argmax(1) == y[part]).sum()
    if not local:
        correct = distributed.all_sum(correct)
    n = len(batches.y)
    return correct.item() / n if n else float("nan")
