"""The main job: train (or load) -> plan with a criterion -> surgery -> fine-tune -> save.

It writes a run directory: ``dense.pt`` and ``pruned.pt`` (see checkpoint.py),
``plan.json`` and ``metrics.json``. Every file is written atomically, and
``metrics.json`` last, so a directory with ``metrics.json`` holds a finished run.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import checkpoint, criteria, data as datasets, models, surgery
from .budget import Budget
from .errors import CompressorError
from .files import write_json, write_text
from .train import TrainConfig, evaluate, fit, pick_device

@dataclass
class RunConfig:
    model: str = "conv4"
    dataset: str = "digits"
    method: str = "l1"
    budget_metric: str = "macs"
    budget: float = 0.5
    epochs: int | None = None  # default: 15, or 0 when starting from --checkpoint
    finetune_epochs: int = 5
    checkpoint: str | None = None
    data_dir: str | None = None
    out: str | None = None
    overwrite: bool = False
    round_to: int = 8
    max_ratio: float = 0.95
    seed: int = 0
    device: str = "auto"
    batch_size: int = 128
    lr: float = 0.05
    finetune_lr: float = 0.01
    schedule: str = "onecycle"
    label_smoothing: float = 0.0
    val_fraction: float = 0.1
    levels: str = "0.25,0.5,0.75"  # sensitivity: damage levels
    damage: str = "zero"  # sensitivity: zero or noise
    steps: int | None = None  # sensitivity (default 1) and psap (default 3): prune / train steps
    step_epochs: int | None = None  # training epochs inside a criterion's steps (default 1)
    from_scratch: bool = False  # no dense training: a training criterion starts from random weights
    resume: bool = False  # continue an interrupted run in --out (from its dense.pt and the criterion's state)
    psap_threshold: float = 0.5
    protect_z: float = 2.0
    ffr_length: float = 0.01
    ffr_curvature: float = 0.01
    ffr_warmup: float = 1.0
    ffr_epochs: int = 5
    ffr_score: str = "bn"
    ffr_compile: str = "auto"  # torch.compile the penalty: auto (GPU only), on, off
    group_size: int = 1
    population: int = 32
    generations: int = 30
    crossover: str = "uniform"
    mutation: float | None = None
    objective: str = "accuracy"
    search_samples: int = 2048
    argv: list[str] = field(default_factory=list)


def default_out(config: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    model = config.model.replace(":", "-").replace(".", "-") if not config.checkpoint else Path(config.checkpoint).stem
    return Path("runs") / f"{model}-{config.dataset}-{config.method}-{config.budget_metric}{config.budget:g}-{stamp}"


def prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CompressorError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CompressorError(f"run directory {out} is not empty; pass --overwrite or choose another --out")
        # metrics.json marks a finished run, so it goes first; the other files are replaced
        # atomically as the new run writes them (the old dense.pt may be this run's --checkpoint)
        (out / "metrics.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "commit": _git_commit()}
    for dist in ("compressor", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    return found


def _git_commit() -> str | None:
    """The commit that produced a result, marked -dirty when the tree had uncommitted changes."""
    here = Path(__file__).parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return (commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run(config: RunConfig) -> dict:
    """Run the whole job and return the metrics it wrote to ``metrics.json``."""
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    # Fail fast on names and numbers, before any data is read or any epoch is spent.
    budget = Budget(config.budget_metric, config.budget)
    if config.method not in criteria.available():
        raise CompressorError(f"unknown method {config.method!r}; available: {', '.join(criteria.available())}")
    if config.from_scratch and (config.checkpoint or config.epochs):
        raise CompressorError("--from-scratch starts from random weights: it takes no --checkpoint and no --epochs")
    if config.from_scratch and config.method not in criteria.from_scratch_methods():
        raise CompressorError(f"--from-scratch needs a criterion that trains from random weights "
                              f"({', '.join(criteria.from_scratch_methods())}), not {config.method}")
    if config.resume:
        if not config.out or not (Path(config.out) / "dense.pt").is_file():
            raise CompressorError("--resume continues a run: give its --out, which must hold the run's dense.pt")
        config = replace(config, checkpoint=str(Path(config.out) / "dense.pt"), epochs=0, overwrite=True)
    if config.checkpoint is None:
        models.resolve(config.model)
    elif not Path(config.checkpoint).is_file():
        raise CompressorError(f"no checkpoint at {config.checkpoint}")
    if config.round_to < 1:
        raise CompressorError(f"--round-to must be at least 1, got {config.round_to}")
    options = criterion_options(config)
    device = pick_device(config.device)
    out = Path(config.out) if config.out else default_out(config)
    prepare_out(out, config.overwrite)
    torch.manual_seed(config.seed)

    stage = time.perf_counter()
    data = datasets.load(config.dataset, config.data_dir, config.val_fraction, config.seed)
    seconds["data"] = time.perf_counter() - stage
    print(f"data: {data.name}, {len(data.train_y)} train / {len(data.val_y)} val / {len(data.test_y)} test, "
          f"{data.num_classes} classes, input {data.input_shape}")

    if config.checkpoint:
        model, spec = checkpoint.load(config.checkpoint, with_spec=True)
        if spec.input_shape != data.input_shape or spec.num_classes != data.num_classes:
            raise CompressorError(
                f"{config.checkpoint} expects input {spec.input_shape} and {spec.num_classes} classes; "
                f"{data.name} gives {data.input_shape} and {data.num_classes}"
            )
        model_name, kwargs = spec.model, spec.factory_kwargs
    else:
        model_name = config.model
        kwargs = models.factory_kwargs(model_name, data.num_classes, data.input_shape[0])
        model = models.build(model_name, **kwargs)
    epochs = config.epochs if config.epochs is not None else (0 if config.checkpoint or config.from_scratch else 15)
    model.to(device)
    graph = surgery.trace(model, data.example_inputs(device=device))  # an untraceable model stops before training

    def spec_of(m):
        return checkpoint.spec_for(m, model_name, kwargs, data.input_shape, data.num_classes,
                                   normalization=data.normalization, dataset=data.name, classes=data.classes)

    train_cfg = TrainConfig(epochs, config.lr, config.batch_size, schedule=config.schedule,
                            label_smoothing=config.label_smoothing, seed=config.seed)
    stage = time.perf_counter()
    history = fit(model, data, train_cfg, device, desc="train")
    seconds["train"] = time.perf_counter() - stage
    acc = {"dense": {"val": evaluate(model, data, "val", device), "test": evaluate(model, data, "test", device)}}
    checkpoint.save(model, spec_of(model), out / "dense.pt")

    stage = time.perf_counter()
    request = criteria.PlanRequest(model, graph.example_inputs, budget, config.round_to, config.max_ratio,
                                   config.seed, data, device, graph, options=options, out_dir=out)
    plan = criteria.make_plan(config.method, request)
    seconds["plan"] = time.perf_counter() - stage
    write_text(out / "plan.json", plan.to_json() + "\n")

    dense_cost = surgery.count(model, graph.example_inputs)
    dense_widths = graph.widths()
    stage = time.perf_counter()
    surgery.apply(model, plan, graph.example_inputs)
    seconds["surgery"] = time.perf_counter() - stage
    pruned_cost = surgery.count(model, graph.example_inputs)
    acc["pruned"] = {"val": evaluate(model, data, "val", device), "test": evaluate(model, data, "test", device)}

    stage = time.perf_counter()
    ft_cfg = TrainConfig(config.finetune_epochs, config.finetune_lr, config.batch_size, schedule="cosine",
                         label_smoothing=config.label_smoothing, seed=config.seed + 1)
    ft_history = fit(model, data, ft_cfg, device, desc="finetune")
    seconds["finetune"] = time.perf_counter() - stage
    acc["finetuned"] = acc["pruned"] if not ft_history else {
        "val": evaluate(model, data, "val", device), "test": evaluate(model, data, "test", device)}
    checkpoint.save(model, spec_of(model), out / "pruned.pt")
    seconds["total"] = time.perf_counter() - t0

    metrics = {
        "status": "complete",
        "out": str(out),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": config.argv or None,
        "config": asdict(config) | {"epochs": epochs, "argv": None},
        "model": model_name,
        "dataset": data.name,
        "method": config.method,
        "budget": {"metric": budget.metric, "fraction": budget.fraction, "tolerance": budget.tolerance},
        "accuracy": acc,
        "macs": {"dense": dense_cost.macs, "pruned": pruned_cost.macs, "fraction": pruned_cost.macs / dense_cost.macs},
        "params": {"dense": dense_cost.params, "pruned": pruned_cost.params,
                   "fraction": pruned_cost.params / dense_cost.params},
        "widths": {"dense": dense_widths, "pruned": plan.widths()},
        "criterion": request.report,
        "seconds": seconds,
        "seconds_per_epoch": {"train": _mean_seconds(history), "finetune": _mean_seconds(ft_history)},
        "history": {"train": history, "finetune": ft_history},
        "device": device_name(device),
        "versions": versions(),
    }
    write_json(out / "metrics.json", metrics)
    print(summary(metrics, out))
    return metrics


def criterion_options(config: RunConfig) -> dict:
    try:
        levels = [float(v) for v in config.levels.split(",") if v.strip()]
    except ValueError:
        raise CompressorError(f"--levels takes numbers separated by commas, not {config.levels!r}") from None
    if config.crossover not in ("uniform", "two-point"):
        raise CompressorError(f"--crossover must be uniform or two-point, not {config.crossover!r}")
    if config.objective not in ("accuracy", "loss"):
        raise CompressorError(f"--objective must be accuracy or loss, not {config.objective!r}")
    if config.ffr_score not in ("bn", "norm"):
        raise CompressorError(f"--ffr-score must be bn or norm, not {config.ffr_score!r}")
    if config.ffr_compile not in ("auto", "on", "off"):
        raise CompressorError(f"--ffr-compile must be auto, on or off, not {config.ffr_compile!r}")
    limits = [("--steps", config.steps, 1), ("--step-epochs", config.step_epochs, 0), ("--population", config.population, 4),
              ("--generations", config.generations, 0), ("--group-size", config.group_size, 1),
              ("--search-samples", config.search_samples, 1), ("--ffr-epochs", config.ffr_epochs, 0),
              ("--ffr-length", config.ffr_length, 0), ("--ffr-curvature", config.ffr_curvature, 0),
              ("--ffr-warmup", config.ffr_warmup, 0), ("--protect-z", config.protect_z, 0)]
    for flag, value, least in limits:
        if value is not None and value < least:
            raise CompressorError(f"{flag} must be at least {least}, got {value}")
    if not 0 < config.psap_threshold < 1:
        raise CompressorError(f"--psap-threshold must lie in (0, 1), got {config.psap_threshold}")
    if config.mutation is not None and not 0 <= config.mutation <= 1:
        raise CompressorError(f"--mutation is a probability in [0, 1], got {config.mutation}")
    names = ("steps", "step_epochs", "from_scratch", "resume", "psap_threshold", "protect_z", "ffr_length",
             "ffr_curvature", "ffr_warmup", "ffr_epochs", "ffr_score", "ffr_compile", "group_size", "population", "generations",
             "crossover", "mutation", "objective", "search_samples")
    return {"levels": levels, "mode": config.damage, "lr": config.lr if config.from_scratch else config.finetune_lr,
            "batch_size": config.batch_size, "label_smoothing": config.label_smoothing, "schedule": config.schedule,
            **{n: getattr(config, n) for n in names}}


def _mean_seconds(history: list[dict]) -> float | None:
    return sum(h["seconds"] for h in history) / len(history) if history else None


def summary(m: dict, out: Path) -> str:
    a = m["accuracy"]
    return "\n".join([
        f"{m['model']} on {m['dataset']}, {m['method']} to {m['budget']['fraction']:g} of {m['budget']['metric']} "
        f"({m['device']})",
        f"  accuracy (test): dense {a['dense']['test']:.2%} -> pruned {a['pruned']['test']:.2%} "
        f"-> fine-tuned {a['finetuned']['test']:.2%}",
        f"  MACs   {m['macs']['dense'] / 1e6:.2f}M -> {m['macs']['pruned'] / 1e6:.2f}M ({m['macs']['fraction']:.2%})",
        f"  params {m['params']['dense'] / 1e6:.3f}M -> {m['params']['pruned'] / 1e6:.3f}M "
        f"({m['params']['fraction']:.2%})",
        f"  time   {m['seconds']['total']:.1f}s; run directory: {out}",
    ])


__all__ = ["RunConfig", "run", "summary"]
