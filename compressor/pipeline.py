"""The main job: train (or load) -> plan with a criterion -> surgery -> fine-tune -> save.

It writes a run directory: ``dense.pt`` and ``pruned.pt`` (see checkpoint.py),
``plan.json`` and ``metrics.json`` (a RunRecord, see record.py). Every file is written atomically, and
``metrics.json`` last, so a directory with ``metrics.json`` holds a finished run.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import checkpoint, criteria, distributed, latency, models, selftest, surgery
from . import data as datasets
from . import record as rec
from .budget import Budget
from .errors import CompressorError
from .files import read_json_object, write_json, write_text
from .provenance import device_name, git_commit, versions  # noqa: F401  (re-exported for old callers)
from .resume import STATE_DIR, RunState
from .rundir import RunDir, make_dir
from .train import TrainConfig, evaluate, fit, pick_device, resolve_defaults

TRAINING_DEFAULTS = ("batch_size", "lr", "finetune_lr", "label_smoothing", "compile")  # None: chosen by device
# A field's role, declared where it is defined: "setting": False, not a setting of the run (a resume may differ in
# it; not in .state/run.json); "per_cell": True, `compress compare` sets it per cell (not in compare-settings.json)
NOT_A_SETTING, PER_CELL = {"setting": False}, {"per_cell": True}

@dataclass
class RunConfig:
    model: str = "conv4"
    dataset: str = "digits"
    method: str = field(default="l1", metadata=PER_CELL)
    budget_metric: str = field(default="macs", metadata=PER_CELL)
    budget: float = field(default=0.5, metadata=PER_CELL)
    epochs: int | None = None  # default: 15, or 0 when starting from --checkpoint
    finetune_epochs: int = 5
    # epochs after the dense model, the criterion's own training included; the rest fine-tunes (None: use
    # finetune_epochs). Equal for every method, this is the equal-epochs rule of `compress compare`.
    pruning_epochs: int | None = None
    distill: float = 0.0  # weight of the dense model's soft targets while fine-tuning (0: off)
    distill_temperature: float = 4.0
    checkpoint: str | None = None
    data_dir: str | None = field(default=None, metadata=PER_CELL)
    out: str | None = field(default=None, metadata=NOT_A_SETTING)
    overwrite: bool = field(default=False, metadata=NOT_A_SETTING)
    round_to: int = 8
    max_ratio: float = 0.95
    seed: int = 0
    split_seed: int | None = None  # the train/validation split's seed (None: seed); a study fixes it across seeds
    device: str = field(default="auto", metadata=PER_CELL)
    # None: chosen by device once it is known (train.device_defaults): CPU 128 / 0.05 / 0.01 / 0.0 / off,
    # CUDA 512 / lr scaled linearly with the batch / 0.1 / on
    batch_size: int | None = None
    lr: float | None = None
    finetune_lr: float | None = None
    schedule: str = "onecycle"
    label_smoothing: float | None = None
    compile: str | None = None  # torch.compile the training model: auto (None: CUDA only), on, off
    val_fraction: float = 0.1
    # auto, memory, stream (ImageFolder trees from disk through DataLoader workers)
    data_mode: str = field(default="auto", metadata=PER_CELL)
    workers: int | None = field(default=None, metadata=NOT_A_SETTING | PER_CELL)  # stream mode's (default min(8, CPUs))
    # the method's own settings: a CriterionConfig of the method's class (None: its defaults), e.g. PSAPConfig()
    criterion: criteria.CriterionConfig | None = field(default=None, metadata=PER_CELL)
    from_scratch: bool = False  # no dense training: a training criterion starts from random weights
    # continue an interrupted run in --out from its last saved progress
    resume: bool = field(default=False, metadata=NOT_A_SETTING)
    checkpoint_every: int = 0  # also save training progress every N steps inside an epoch (0: at epoch ends)
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    # latency budget (budget_metric "latency": budget = fraction of dense latency; "latency_ms": budget = ms)
    latency_backend: str = "ort-cpu"
    latency_batch: int = 1
    latency_cache: str | None = None  # default $COMPRESSOR_LATENCY_CACHE or ~/.cache/compressor/latency
    latency_step: int | None = None  # table grid step in channels (default: a coarse grid, refined where it steps)
    latency_precision: str = "fp32"  # fp32; int8 (ONNX Runtime: QDQ layers, as --export onnx-int8); fp16 (GPU)
    # model factories ("module:function") a checkpoint or a resumed run's settings may name beyond the registry
    # and torchvision's classification models (models.check_trusted); --model itself is always trusted
    trust_factories: list[str] = field(default_factory=list, metadata=NOT_A_SETTING | PER_CELL)
    argv: list[str] = field(default_factory=list, metadata=NOT_A_SETTING | PER_CELL)

    def validate(self) -> RunConfig:
        """Refuse a bad number or name with one clear CompressorError; ``run`` calls this before anything else.

        Numbers must be finite (no NaN or inf), whole where they count things, and in range, so the
        CLI and the API refuse the same inputs with the same words, before any data is read.
        """
        from .checks import choice, number
        from .train import SCHEDULES

        bad = [f for f in self.trust_factories if not isinstance(f, str) or f.count(":") != 1 or f.startswith(":")
               or f.endswith(":")]
        if bad:
            raise CompressorError(f"--trust-factory takes 'module.path:function', not {bad[0]!r}")
        number("--epochs", self.epochs, integer=True, low=0, optional=True)
        number("--finetune-epochs", self.finetune_epochs, integer=True, low=0)
        number("--pruning-epochs", self.pruning_epochs, integer=True, low=0, optional=True)
        number("--distill", self.distill, low=0, high=1)
        number("--distill-temperature", self.distill_temperature, low=0, low_open=True)
        number("--split-seed", self.split_seed, integer=True, low=0, high=2**32 - 1, optional=True)
        number("--lr", self.lr, low=0, low_open=True, optional=True)
        number("--finetune-lr", self.finetune_lr, low=0, low_open=True, optional=True)
        number("--batch-size", self.batch_size, integer=True, low=1, optional=True)
        number("--label-smoothing", self.label_smoothing, low=0, high=1, high_open=True, optional=True)
        number("--workers", getattr(self, "workers", None), integer=True, low=0, optional=True)
        if getattr(self, "compile", None) is not None:
            choice("--compile", self.compile, ("auto", "on", "off"))
        choice("--data-mode", getattr(self, "data_mode", "auto"), ("auto", "memory", "stream"))
        number("--val-fraction", self.val_fraction, low=0, high=1, high_open=True)
        number("--max-ratio", self.max_ratio, low=0, high=1, low_open=True, high_open=True)
        number("--round-to", self.round_to, integer=True, low=1)
        number("--seed", self.seed, integer=True, low=0, high=2**32 - 1)
        number("--checkpoint-every", getattr(self, "checkpoint_every", 0), integer=True, low=0)
        if self.budget_metric in ("macs", "params"):
            number(f"--budget-{self.budget_metric}", self.budget, low=0, high=1, low_open=True)
        latency.check_config(self)  # the metric's name; a latency budget's backend, batch and fraction / ms
        choice("--schedule", self.schedule, SCHEDULES)
        if self.method in criteria.available():
            expected = criteria.config_class(self.method)
            if self.criterion is not None and not isinstance(self.criterion, expected):
                raise CompressorError(f"{self.method} takes a {expected.__name__} as its criterion settings, "
                                      f"not a {type(self.criterion).__name__}")  # fields: checked when built
            self.criterion_config().check_budget(self.budget_metric)
        return self

    def criterion_config(self) -> criteria.CriterionConfig:
        """The method's settings: as given, or the method's defaults."""
        return self.criterion if self.criterion is not None else criteria.default_config(self.method)


def default_out(config: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    model = config.model.replace(":", "-").replace(".", "-") if not config.checkpoint else Path(config.checkpoint).stem
    return Path("runs") / f"{model}-{config.dataset}-{config.method}-{config.budget_metric}{config.budget:g}-{stamp}"


def _self_test(model: torch.nn.Module, data) -> dict | None:
    """The saved model's answers on a few test images, on the CPU: runtime.load re-runs them where it is served
    (compressor.selftest). None for streamed data, whose test images are not in memory."""
    if not isinstance(data, datasets.ImageData) or len(data.test_y) == 0:
        return None
    x = next(iter(datasets.DeviceBatches(data, "test", 64, "cpu")))[0]
    copy_ = copy.deepcopy(model).float().cpu().eval()
    with torch.no_grad():
        logits = copy_(x)
    return selftest.make(x, logits, logits, 0.99, "checkpoint")


def _trusted(config: RunConfig) -> list[str]:
    """The factories a file may name in this run: --trust-factory's, and --model's own (the user typed it)."""
    return [*config.trust_factories, *([config.model] if ":" in config.model else [])]


def _nothing_done(out: Path) -> bool:
    """An empty folder, or one where a run stopped before any work was saved (a bad data set found after
    the folder was made): only .state/ with the settings and the lock. Running again there loses nothing."""
    entries = list(out.iterdir())
    if not entries:
        return True
    state = out / STATE_DIR
    return entries == [state] and state.is_dir() and all(p.name in (RUN_JSON, "lock") for p in state.iterdir())


def prepare_out(out: Path, overwrite: bool) -> None:
    make_dir(out)  # now, not after training: a directory that cannot be made stops the run here
    if out.is_dir() and not _nothing_done(out):
        if not overwrite:
            raise CompressorError(f"run directory {out} is not empty; pass --overwrite or choose another --out")
    if not distributed.is_main():
        return  # under torchrun, rank 0 prepares the directory
    # metrics.json marks a finished run, so it goes first; the other files are replaced
    # atomically as the new run writes them (the old dense.pt may be this run's --checkpoint)
    RunDir(out).metrics.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def run(config: RunConfig, latency_model=None) -> dict:
    """Run the whole job and return the metrics it wrote to ``metrics.json``.

    ``latency_model``: a :class:`compressor.latency.LatencyModel` already measured for this model on the
    run's latency backend, batch and precision (a study shares one between its cells); else a latency
    budget measures its own."""
    config.validate()  # every number and name, before any data is read or any epoch is spent
    t0 = time.perf_counter()
    saved_config = None
    trusted = _trusted(config)  # the command's own --model is the user's to run
    if distributed.restarted():  # torchrun's elastic agent restarted the workers: go on, don't redo
        config = replace(config, resume=True)
    if distributed.launched() and not config.out:
        raise CompressorError("under torchrun, give --out: every rank, and a restarted job, must find the same run")
    if config.resume:
        if not config.out:
            raise CompressorError("--resume continues a run: give its --out")
        if RunDir(config.out).finished():
            print(f"{config.out} holds a finished run (metrics.json); nothing to resume")
            return RunDir(config.out).read_metrics()  # a record of another format: one message
        saved_config = _saved_config(Path(config.out))
        if saved_config is None:
            print(f"--resume: nothing saved in {config.out}; starting the run from the beginning")
        else:
            config = _resumed(config, saved_config)
            models.check_trusted(config.model, trusted, where=f"the interrupted run's settings "
                                                              f"({Path(config.out) / STATE_DIR / RUN_JSON})")
            config.validate()  # the saved settings are a file's words: checked like the command line's
    # Fail fast on names and numbers, before any data is read or any epoch is spent.
    budget = latency.budget_from(config.budget_metric, config.budget, config.latency_backend, config.latency_batch,
                                 config.latency_cache, config.latency_step, config.latency_precision, config.device)
    if config.method not in criteria.available():
        raise CompressorError(f"unknown method {config.method!r}; available: {', '.join(criteria.available())}")
    if config.from_scratch and (config.checkpoint or config.epochs):
        raise CompressorError("--from-scratch starts from random weights: it takes no --checkpoint and no --epochs")
    if config.from_scratch and config.method not in criteria.from_scratch_methods():
        raise CompressorError(f"--from-scratch needs a criterion that trains from random weights "
                              f"({', '.join(criteria.from_scratch_methods())}), not {config.method}")
    if config.checkpoint_every < 0:
        raise CompressorError(f"--checkpoint-every must be at least 0, got {config.checkpoint_every}")
    if config.checkpoint is None:
        models.resolve(config.model)
    elif not Path(config.checkpoint).is_file():
        raise CompressorError(f"no checkpoint at {config.checkpoint}")
    if config.round_to < 1:
        raise CompressorError(f"--round-to must be at least 1, got {config.round_to}")
    device = distributed.setup(pick_device(config.device))
    distributed.quiet_others()
    out = Path(config.out) if config.out else default_out(config)
    prepare_out(out, config.overwrite or config.resume)
    distributed.barrier()  # every rank has checked the directory before rank 0 changes it
    state = RunState(out, config.checkpoint_every)
    state.lock()
    try:
        if saved_config is None:  # a fresh run forgets any earlier one's progress
            state.clear()
            write_json(state.dir / RUN_JSON, _comparable(config))
        left = state.remove_partials()
        if left:
            print(f"removed {len(left)} unfinished file(s) of an interrupted process: "
                  f"{', '.join(p.name for p in left)}")
        distributed.barrier()  # no rank reads saved progress before rank 0 has cleared a stale one
        metrics = _run(config, out, state, budget, device, t0, resumed=saved_config is not None,
                       latency_model=latency_model)
        state.close(finished=True)
    finally:
        state.close(finished=False)
    return metrics


def _run(config: RunConfig, out: Path, state: RunState, budget: Budget, device: torch.device, t0: float,
         resumed: bool, latency_model=None) -> dict:
    seconds: dict[str, float] = {}
    torch.manual_seed(config.seed)
    # batch size, learning rates, label smoothing and compile left open are chosen for the device, once
    resolved, chosen = resolve_defaults(device.type, {k: getattr(config, k) for k in TRAINING_DEFAULTS})
    config = replace(config, **{k: v for k, v in resolved.items() if k != "compile"},
                     compile="on" if resolved["compile"] else "off")
    training_defaults = {"device": device.type, **resolved, "chosen": chosen}

    stage = time.perf_counter()
    split_seed = config.seed if config.split_seed is None else config.split_seed
    data = datasets.load(config.dataset, config.data_dir, config.val_fraction, split_seed, mode=config.data_mode,
                         workers=config.workers)
    seconds["data"] = time.perf_counter() - stage
    if not isinstance(data, datasets.ImageData):
        print(f"data: streaming {data.name} from disk with {data.workers} loader workers")
    print(f"data: {data.name}, {len(data.train_y)} train / {len(data.val_y)} val / {len(data.test_y)} test, "
          f"{data.num_classes} classes, input {data.input_shape}")

    if config.checkpoint:
        # a compressor checkpoint carries its architecture; a plain state_dict is for --model
        model, spec = checkpoint.load_for_run(config.checkpoint, config.model, data.num_classes, data.input_shape[0],
                                              trusted_factories=_trusted(config))
        if spec is None:
            model_name = config.model
            kwargs = models.factory_kwargs(model_name, data.num_classes, data.input_shape[0])
        elif spec.input_shape != data.input_shape or spec.num_classes != data.num_classes:
            raise CompressorError(
                f"{config.checkpoint} expects input {spec.input_shape} and {spec.num_classes} classes; "
                f"{data.name} gives {data.input_shape} and {data.num_classes}"
            )
        else:
            model_name, kwargs = spec.model, spec.factory_kwargs
    else:
        model_name = config.model
        kwargs = models.factory_kwargs(model_name, data.num_classes, data.input_shape[0])
        model = models.build(model_name, **kwargs)
    epochs = config.epochs if config.epochs is not None else (0 if config.checkpoint or config.from_scratch else 15)
    model.to(device)
    if config.sync_bn and distributed.active():
        if device.type != "cuda":
            raise CompressorError("--sync-bn needs CUDA GPUs (SyncBatchNorm runs on NCCL); on CPUs each rank keeps "
                                  "its own BatchNorm statistics")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state_dict: checkpoints load as plain BN
    graph = surgery.trace(model, data.example_inputs(device=device))  # an untraceable model stops before training

    def spec_of(m):
        return checkpoint.spec_for(m, model_name, kwargs, data.input_shape, data.num_classes,
                                   normalization=data.normalization, dataset=data.name, classes=data.classes)

    train_cfg = TrainConfig(epochs, config.lr, config.batch_size, schedule=config.schedule,
                            label_smoothing=config.label_smoothing, seed=config.seed, compile=resolved["compile"])
    stage = time.perf_counter()
    history = fit(model, data, train_cfg, device, desc="train", state=state.stage("train"))
    seconds["train"] = time.perf_counter() - stage
    dense_acc = _accuracy(model, data, device)
    checkpoint.save(model, spec_of(model), RunDir(out).dense, self_test=_self_test(model, data))
    teacher = copy.deepcopy(model).eval() if config.distill > 0 else None  # criteria may train the model on

    stage = time.perf_counter()
    budget = latency.prepare(budget, graph, device, config.round_to, config.max_ratio,  # table, dense latency
                             model=latency_model)
    # a criterion trains at the fine-tuning rate, or the dense one when it starts from random weights
    criterion_training = TrainConfig(0, config.lr if config.from_scratch else config.finetune_lr, config.batch_size,
                                     schedule=config.schedule, label_smoothing=config.label_smoothing,
                                     seed=config.seed, compile=resolved["compile"])
    request = criteria.PlanRequest(model, graph.example_inputs, budget, config.round_to, config.max_ratio,
                                   config.seed, data, device, graph, train=criterion_training,
                                   from_scratch=config.from_scratch, resume=config.resume, out_dir=out, state=state)
    plan = criteria.make_plan(config.method, request, config.criterion_config())
    if distributed.active():  # every rank prunes alike: rank 0's plan, checked against each rank's own
        own, plan = plan, distributed.broadcast(plan)
        same = all(distributed.all_gather(own.keep == plan.keep))
        request.report["distributed"] = {"world": distributed.world(), "plans_equal_on_every_rank": same}
        if not same:
            print("warning: the ranks' plans differed (nondeterministic kernels?); every rank uses rank 0's")
    seconds["plan"] = time.perf_counter() - stage
    write_text(RunDir(out).plan, plan.to_json() + "\n")

    finetune_epochs = config.finetune_epochs
    if config.pruning_epochs is not None:  # equal epochs: what the criterion trained counts against the total
        finetune_epochs = config.pruning_epochs - request.train_epochs
        if finetune_epochs < 0:
            raise CompressorError(f"{config.method} trained {request.train_epochs} epochs on its own, more than "
                                  f"--pruning-epochs {config.pruning_epochs}; give more epochs or fewer criterion "
                                  "steps")
    dense_cost = surgery.count(model, graph.example_inputs)
    dense_widths = graph.widths()
    stage = time.perf_counter()
    surgery.apply(model, plan, graph.example_inputs)
    seconds["surgery"] = time.perf_counter() - stage
    pruned_cost = surgery.count(model, graph.example_inputs)
    pruned_acc = _accuracy(model, data, device)

    stage = time.perf_counter()
    ft_cfg = TrainConfig(finetune_epochs, config.finetune_lr, config.batch_size, schedule="cosine",
                         label_smoothing=config.label_smoothing, seed=config.seed + 1, compile=resolved["compile"],
                         distill=config.distill, temperature=config.distill_temperature)
    ft_history = fit(model, data, ft_cfg, device, desc="finetune", state=state.stage("finetune"), teacher=teacher)
    seconds["finetune"] = time.perf_counter() - stage
    acc = rec.Accuracy(dense_acc, pruned_acc, _accuracy(model, data, device) if ft_history else pruned_acc)
    checkpoint.save(model, spec_of(model), RunDir(out).pruned, self_test=_self_test(model, data))
    seconds["total"] = time.perf_counter() - t0

    record = rec.RunRecord(
        resumed=resumed,  # if so, wall times count only the last process
        out=str(out),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=config.argv or None,
        config=asdict(config) | {"epochs": epochs, "argv": None},
        training_defaults=training_defaults,
        model=model_name,
        dataset=data.name,
        method=config.method,
        budget=rec.BudgetTarget(budget.metric, budget.fraction, budget.tolerance),
        **latency.run_metrics(budget, model, dense_cost, pruned_cost),  # {"latency": ...} for a latency budget
        accuracy=acc,
        epochs=rec.Epochs(epochs, request.train_epochs, finetune_epochs, request.train_epochs + finetune_epochs),
        distill=rec.Distill(config.distill, config.distill_temperature) if config.distill else None,
        macs=rec.Cost(dense_cost.macs, pruned_cost.macs, pruned_cost.macs / dense_cost.macs),
        params=rec.Cost(dense_cost.params, pruned_cost.params, pruned_cost.params / dense_cost.params),
        widths=rec.Widths(dense_widths, plan.widths()),
        criterion=request.report,
        seconds=rec.Seconds(**seconds),
        seconds_per_epoch=rec.PerEpoch(_mean_seconds(history), _mean_seconds(ft_history)),
        history=rec.History(history, ft_history),
        device=device_name(device),
        versions=versions(),
    )
    distributed.barrier()  # a rank that died stops the job here: no metrics.json for an unfinished run
    metrics = record.to_json()
    write_json(RunDir(out).metrics, metrics)
    print(summary(record, out))
    return metrics


def _accuracy(model: torch.nn.Module, data, device: torch.device) -> rec.Split:
    return rec.Split(evaluate(model, data, "val", device), evaluate(model, data, "test", device))


RUN_JSON = "run.json"
RUN_JSON_FORMAT = "compressor.run-settings/1"  # a new, renamed or removed setting means a new number


def field_names(role: str, default: bool = False) -> list[str]:
    """RunConfig's fields whose metadata gives ``role`` (see NOT_A_SETTING, PER_CELL) true."""
    return [f.name for f in fields(RunConfig) if f.metadata.get(role, default)]


def _comparable(config: RunConfig) -> dict:
    """The settings that define a run (what a resume must share with it), as .state/run.json holds them."""
    return {"format": RUN_JSON_FORMAT, **{k: v for k, v in asdict(config).items() if k in field_names("setting", True)}}


def _saved_config(out: Path) -> dict | None:
    path = out / STATE_DIR / RUN_JSON
    if not path.is_file():
        return None
    fix = "start the run afresh with --overwrite"
    saved = read_json_object(path, "a run's settings", fix)
    rec.check_format(saved, RUN_JSON_FORMAT, path, "a run's settings", fix)
    unknown = sorted(set(saved) - {"format", *field_names("setting", True)})
    if unknown:  # a setting this version does not have: resumed without it, the run would be neither
        raise rec.versioned(path, "a run's settings", RUN_JSON_FORMAT,
                            f"{RUN_JSON_FORMAT!r} with a setting {unknown[0]!r} it does not define", fix)
    return {k: v for k, v in saved.items() if k != "format"}


def _resumed(config: RunConfig, saved: dict) -> RunConfig:
    """The interrupted run's settings. An option left at its default takes the saved value; one given
    with another value than the run had is refused (the result would be neither run)."""
    defaults = RunConfig()
    clashes, merged = [], {}
    for name, was in saved.items():
        now = getattr(config, name)
        if name == "criterion":  # saved as its fields: each compared as an option, rebuilt as the method's config
            clashes += _criterion_clashes(config, saved)
        elif now != getattr(defaults, name) and now != was:
            clashes.append(f"--{name.replace('_', '-')} {now} (the run had {was})")
        merged[name] = was
    if merged.get("criterion") is not None:
        try:
            merged["criterion"] = criteria.config_class(saved["method"])(**merged["criterion"])
        except (TypeError, KeyError) as exc:
            raise CompressorError(f"--resume: the interrupted run's saved criterion settings do not fit this "
                                  f"version of compressor ({exc}); start the run afresh with --overwrite") from None
    if clashes:
        raise CompressorError("--resume continues the interrupted run with its own settings; these differ: "
                              + "; ".join(clashes))
    return replace(config, **merged)


def _criterion_clashes(config: RunConfig, saved: dict) -> list[str]:
    """The criterion options given with another value than the interrupted run had (a default is not given)."""
    was = saved.get("criterion") or {}
    cls = criteria.config_class(saved.get("method", config.method))
    default = json.loads(json.dumps(asdict(cls())))
    now = json.loads(json.dumps(asdict(config.criterion))) if config.criterion is not None else default
    flags = {f.name: f.metadata["option"]["flag"] for f in cls.options()}
    return [f"{flags.get(k, k)} {now[k]} (the run had {was.get(k, default[k])})" for k in now
            if now[k] != default[k] and now[k] != was.get(k, default[k])]


def _mean_seconds(history: list[dict]) -> float | None:
    return sum(h["seconds"] for h in history) / len(history) if history else None


def summary(m: rec.RunRecord | dict, out: Path) -> str:
    """A finished run in five lines (``m``: its record, or metrics.json's content)."""
    m = m if isinstance(m, rec.RunRecord) else rec.RunRecord.from_json(m, RunDir(out).metrics)
    a, macs, params = m.accuracy, m.macs, m.params
    return "\n".join([
        f"{m.model} on {m.dataset}, {m.method} to {m.budget.fraction:g} of {m.budget.metric} ({m.device})",
        f"  accuracy (test): dense {a.dense.test:.2%} -> pruned {a.pruned.test:.2%} "
        f"-> fine-tuned {a.finetuned.test:.2%}",
        f"  MACs   {macs.dense / 1e6:.2f}M -> {macs.pruned / 1e6:.2f}M ({macs.fraction:.2%})",
        f"  params {params.dense / 1e6:.3f}M -> {params.pruned / 1e6:.3f}M ({params.fraction:.2%})",
        f"  time   {m.seconds.total:.1f}s; run directory: {out}",
    ])


__all__ = ["RunConfig", "run", "summary"]
