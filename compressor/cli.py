"""The ``compress`` command. Subcommands stay thin: the work lives in the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from . import criteria, distributed, models
from .errors import CompressorError
from .export import FORMATS
from .options import add_argument
from .pipeline import RunConfig, run


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train or load a model, prune it to a budget, fine-tune, save",
                       description="Train (or load) -> prune with a criterion -> fine-tune -> write a run directory.")
    _model_options(p)
    p.add_argument("--method", default="l1", help=f"pruning criterion: {', '.join(criteria.available())} (default l1)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-macs", type=float, metavar="F", help="fraction of MACs to keep (default 0.5)")
    budget.add_argument("--budget-params", type=float, metavar="F", help="fraction of parameters to keep")
    budget.add_argument("--budget-latency", type=float, metavar="F",
                        help="fraction of the dense model's measured latency to keep (see 'latency budget')")
    budget.add_argument("--budget-ms", type=float, metavar="T", help="target latency in milliseconds")
    _latency_options(p, "with --budget-latency / --budget-ms: a per-layer latency table is measured on the "
                     "backend (cached), the widths solved against it, and the pruned model timed whole (within 10%% "
                     "of the target, else the target is corrected and solved again)")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--pruning-epochs", type=int, metavar="N",
                   help="epochs after the dense model, the criterion's own training included (FFR's regularised "
                        "epochs, PSAP's steps, ...); fine-tuning gets the rest. Replaces --finetune-epochs")
    p.add_argument("--out", help="run directory (default runs/<model>-<dataset>-<method>-<budget>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run files in a non-empty --out")
    _training_options(p)
    p.add_argument("--from-scratch", action="store_true",
                   help="skip dense training; psap/ffr train from the random initialisation")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last saved "
                   "epoch (smoea: generation), with the run's own settings")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (default: each rank's own)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="also save training progress every N steps inside an epoch (default 0: at epoch ends only)")
    _criterion_options(p)
    p.add_argument("--export", metavar="FORMATS", help="after the run, export the pruned model: "
                   + ",".join(FORMATS.names()))
    p.add_argument("--bench", action="store_true", help="after the run, benchmark dense vs pruned (see compress bench)")
    _export_options(p)
    _bench_options(p)


def _latency_options(p, description: str) -> None:
    from . import latency

    g = p.add_argument_group("latency budget", description)
    g.add_argument("--latency-backend", default="ort-cpu", choices=latency.backend_names(),
                   help="where latency is measured: a bench backend; ort-cpu (default) / ort-cuda name ONNX "
                        "Runtime's device; eager/compile run on --device")
    g.add_argument("--latency-batch", type=int, default=1, metavar="B", help="batch size timed (default 1)")
    g.add_argument("--latency-precision", default="fp32", choices=latency.PRECISIONS,
                   help="fp32 (default); int8: ONNX Runtime QDQ layers, as --export onnx-int8 deploys; fp16: GPUs")
    g.add_argument("--latency-cache", metavar="DIR", help="latency table cache (default $COMPRESSOR_LATENCY_CACHE, "
                   "else $XDG_CACHE_HOME/compressor/latency, i.e. ~/.cache/compressor/latency)")
    g.add_argument("--latency-step", type=int, metavar="C", help="a fixed table grid on multiples of C channels "
                   "(default: 6 widths per group, refined where a layer's latency steps)")


def _model_options(p) -> None:
    p.add_argument("--model", default="conv4",
                   help=f"registry name ({', '.join(models.available())}) or 'module.path:factory' (default conv4)")
    p.add_argument("--dataset", default="digits",
                   help="digits, synthetic, mnist, cifar10, cifar100, or an ImageFolder name/path (default digits)")
    p.add_argument("--data-dir", help="where data sets live or download to (default ./data)")
    p.add_argument("--epochs", type=int, help="dense training epochs (default 15, or 0 with --checkpoint)")
    p.add_argument("--checkpoint", help="start from this trained checkpoint instead of training from scratch")
    _trust_option(p)


def _trust_option(p) -> None:
    p.add_argument("--trust-factory", dest="trust_factories", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a model factory that a checkpoint (or a resumed run) may name and so have imported and "
                        "called, beyond the registered models and torchvision's classification models; repeatable")


def _training_options(p) -> None:
    """How every model trains and is pruned: shared by `run` and `compare`."""
    p.add_argument("--round-to", type=int, default=8, help="remaining widths are multiples of this (default 8)")
    p.add_argument("--max-ratio", type=float, default=0.95, help="most of any one group that may be removed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, help="training batch (default by device: CPU 128, CUDA 512)")
    p.add_argument("--lr", type=float, help="peak learning rate of dense training (default: CPU 0.05; CUDA "
                   "0.05 x batch / 128)")
    p.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate (default: CPU 0.01; CUDA "
                   "0.01 x batch / 128)")
    p.add_argument("--schedule", default="onecycle", choices=["onecycle", "cosine"])
    p.add_argument("--label-smoothing", type=float, help="default by device: CPU 0, CUDA 0.1")
    p.add_argument("--compile", choices=["auto", "on", "off"],
                   help="torch.compile the training model (default auto: on CUDA only; on a CPU it needs a C++ "
                        "compiler)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out for scoring")
    p.add_argument("--data-mode", default="auto", choices=["auto", "memory", "stream"],
                   help="memory: decode the set into memory; stream: read ImageFolder trees from disk in DataLoader "
                        "workers; auto (default): stream a folder whose decoded images exceed 4 GiB")
    p.add_argument("--workers", type=int, metavar="N", help="stream mode's DataLoader workers (default min(8, CPUs))")
    g = p.add_argument_group("distillation", "fine-tune against the dense model's soft targets (Hinton et al.)")
    g.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="weight of the distillation term in the fine-tuning loss, in [0, 1] (default 0: off)")
    g.add_argument("--distill-temperature", type=float, default=4.0, metavar="T",
                   help="softmax temperature (default 4)")


def _criterion_options(p) -> None:
    """Each criterion's settings, from its config class in the registry: one group per criterion. A flag
    several criteria declare (--steps) is added once, with each one's default in its help."""
    declared: dict[str, list] = {}
    for entry in criteria.CRITERIA:
        for f in entry.info["config"].options():
            declared.setdefault(f.metadata["option"]["flag"], []).append((entry.name, f))
    shared = p.add_argument_group("shared by several criteria")
    groups = {}
    for flag, owners in declared.items():
        method, f = owners[0]
        meta = f.metadata["option"]
        if len(owners) > 1:
            group = shared
            defaults = "; ".join(f"{m} {criteria.shown_default(o)}" for m, o in owners)
            help_text = f"{meta['help']} (default: {defaults})"
        else:
            if method not in groups:
                doc = (criteria.config_class(method).__doc__ or "").strip().splitlines()[0]
                groups[method] = p.add_argument_group(f"{method} criterion", doc)
            group = groups[method]
            help_text = f"{meta['help']} (default {criteria.shown_default(f)})"
        add_argument(group, f, help_text, default=argparse.SUPPRESS)


def _criterion_configs(args) -> dict:
    """Every criterion's config from the criterion flags given (each checked by its config class)."""
    given = {f: v for f, v in vars(args).items() if any(criteria.declares(m, f) for m in criteria.available())}
    return criteria.configs_from(given), given


def _compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="methods x budgets x seeds from one dense model, at equal epochs",
                       description="Train one dense model (or take --checkpoint), then prune it with every method "
                                   "at every budget and seed, each cell training --pruning-epochs epochs after the "
                                   "dense model. Writes compare.json, compare.md (mean ± std, difference from l1 "
                                   "paired by seed with a 95%% CI) and compare.png; every cell is a run directory. "
                                   "Re-run the same command to continue an interrupted study.")
    _model_options(p)
    p.add_argument("--methods", default="l1,random,tp-l1-global,sensitivity,psap,ffr,smoea",
                   help=f"comma-separated, from {', '.join(criteria.available())} (l1 and random are always added)")
    p.add_argument("--budgets", default="params:0.1",
                   help="metric:fraction items, e.g. params:0.1656,macs:0.25,latency:0.5 (latency: measured on "
                        "--latency-backend at --latency-batch; one latency model shared by every latency cell)")
    p.add_argument("--seeds", default="3", help="a count (3: seeds 0, 1, 2) or a list (0,5,9) (default 3)")
    p.add_argument("--pruning-epochs", type=int, required=True, metavar="N",
                   help="epochs every cell trains after the dense model: the criterion's own training counts, "
                        "fine-tuning gets the rest")
    p.add_argument("--out", required=True, help="study directory (re-run with the same --out to continue)")
    _training_options(p)
    _latency_options(p, "with latency:F budgets")
    _criterion_options(p)


def _export_options(p) -> None:
    from .export.config import ExportConfig

    ExportConfig.add_arguments(p.add_argument_group("export"))


def _bench_options(p) -> None:
    from .bench.config import BenchConfig

    BenchConfig.add_arguments(p.add_argument_group("benchmark"))


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a run's pruned model (ONNX, TensorRT, AOTInductor), verified")
    p.add_argument("source", help="a run directory (its pruned.pt) or a checkpoint file")
    p.add_argument("--formats", default="onnx", help=f"{','.join(FORMATS.names())} (default onnx)")
    p.add_argument("--out", help="output folder (default RUN_DIR/export)")
    p.add_argument("--data-dir", help="where the checkpoint's data set lives (for the verification batch)")
    _trust_option(p)
    _export_options(p)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time a run's dense and pruned models on each backend",
                       description="Time dense against pruned, interleaved, on each backend, precision and batch "
                                   "size. Each point lands in RUN_DIR/bench.jsonl as it finishes; bench.json, "
                                   "bench.md and plots are written at the end.")
    p.add_argument("run_dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--resume", action="store_true",
                   help="continue the bench.jsonl of an interrupted bench (same settings), skipping its points")
    p.add_argument("--overwrite", action="store_true", help="start afresh, replacing an earlier bench.jsonl")
    _trust_option(p)
    _bench_options(p)


def _analyze_parser(sub) -> None:
    p = sub.add_parser("analyze", help="sensitivity analysis of a trained model, or (--latency) why a pruned "
                       "model is (not) faster: tables and plots")
    p.add_argument("source", help="a run directory (its dense.pt) or a checkpoint file")
    p.add_argument("--latency", action="store_true", help="per group of a run directory: MACs removed against ms "
                   "saved on --latency-backend, and widths on a slow step of the table (latency-why.md/.json/.png)")
    p.add_argument("--round-to", type=int, help="--latency: the table's grid (default: the run's --round-to)")
    p.add_argument("--max-ratio", type=float, help="--latency: default the run's --max-ratio")
    p.add_argument("--method", default="sensitivity", choices=["sensitivity"])
    p.add_argument("--levels", default="0.25,0.5,0.75")
    p.add_argument("--damage", default="zero", choices=["zero", "noise"])
    p.add_argument("--data-dir")
    p.add_argument("--device", default="auto")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="must match the run's, to stay off its training images")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (it fixes the validation split)")
    p.add_argument("--out", help="output folder (default: the run directory, or the checkpoint's folder)")
    _latency_options(p, "with --latency")
    _trust_option(p)


def cmd_analyze(args, _argv) -> None:
    from .criteria.sensitivity import SensitivityConfig, analyze_source

    if args.latency:
        return _analyze_latency(args)

    config = SensitivityConfig(levels=args.levels, damage=args.damage)  # checked before any file is read
    analysis, paths = analyze_source(args.source, config, data_dir=args.data_dir, device=args.device,
                                     val_fraction=args.val_fraction, seed=args.seed, out=args.out,
                                     trusted_factories=args.trust_factories)
    for path in paths:
        print(f"wrote {path}")
    for name, value in sorted(analysis["sensitiveness"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:30s} sensitiveness {value:.4f}")


def _analyze_latency(args) -> None:
    from . import latency
    from .checks import number
    from .latency import why
    from .train import pick_device

    if not Path(args.source).is_dir():
        raise CompressorError(f"compress analyze --latency takes a run directory, not {args.source}")
    ran = why.run_settings(args.source)  # the run's own: its grid, and a latency budget's backend
    settings = {k: getattr(args, k) for k in ("latency_backend", "latency_batch", "latency_precision")}
    if ran.get("budget_metric") in ("latency", "latency_ms") and all(
            settings[k] == RunConfig.__dataclass_fields__[k].default for k in settings):
        settings = {k: ran.get(k, v) for k, v in settings.items()}
    round_to = number("--round-to", args.round_to if args.round_to is not None else ran.get("round_to", 8),
                      integer=True, low=1)
    max_ratio = number("--max-ratio", args.max_ratio if args.max_ratio is not None else ran.get("max_ratio", 0.95),
                       low=0, high=1, low_open=True, high_open=True)
    spec = latency.LatencySpec(settings["latency_backend"], settings["latency_batch"], settings["latency_precision"],
                               cache_dir=args.latency_cache, step=args.latency_step)
    report, paths = why.explain(args.source, spec, pick_device(args.device), round_to, max_ratio,
                                trusted_factories=args.trust_factories, out=args.out)
    print(Path(paths[1]).read_text())
    for path in paths:
        print(f"wrote {path}")


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="print a checkpoint's architecture spec, MACs and parameters")
    p.add_argument("checkpoint")
    _trust_option(p)


def cmd_run(args, argv) -> None:
    from .bench.config import BenchConfig
    from .bench.run import bench
    from .export import parse_formats
    from .export import require as require_formats
    from .export.config import ExportConfig
    from .export.run import export
    from .train import pick_device

    metric, fraction = next(((m, v) for m, v in (("params", args.budget_params), ("latency", args.budget_latency),
                                                  ("latency_ms", args.budget_ms)) if v is not None),
                            ("macs", args.budget_macs))
    fields = {k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__}
    configs, given = _criterion_configs(args)
    config = RunConfig(**fields, budget_metric=metric, budget=0.5 if fraction is None else fraction,
                       criterion=configs.get(args.method), argv=["compress", *argv])
    # every mistake the export and benchmark after the run would meet stops now, not after training
    config.validate()
    if args.method in criteria.available():
        for name in (n for n in given if not criteria.declares(args.method, n)):
            print(f"compress: note: --{name.replace('_', '-')} is not an option of {args.method}; ignored",
                  file=sys.stderr)
    formats = parse_formats(args.export)
    export_config, bench_config = ExportConfig.from_args(args), BenchConfig.from_args(args)
    if args.bench:
        bench_config.resolve(pick_device(args.device))  # backends and precisions possible on the device
    require_formats(formats, export_config)  # TensorRT and each format's own needs, before training
    metrics = run(config)
    out = metrics["out"]
    if formats:
        export(out, ",".join(formats), data_dir=args.data_dir, config=export_config,
               trusted_factories=args.trust_factories)
    if args.bench:
        # `compress run --resume/--overwrite --bench` continues or replaces the run's bench.jsonl too
        bench(out, bench_config, device=args.device, resume=args.resume, overwrite=args.overwrite,
              argv=["compress", *argv], trusted_factories=args.trust_factories)


def cmd_compare(args, argv) -> None:
    from .compare import compare, parse_budgets, parse_methods, parse_seeds

    fields = {k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__ and k != "out"}
    base = RunConfig(**fields).validate()  # every number, before any data is read
    configs, _ = _criterion_configs(args)
    methods = parse_methods(args.methods)
    compare(base, methods, parse_budgets(args.budgets), parse_seeds(args.seeds), args.out,
            configs={m: configs[m] for m in methods}, argv=["compress", *argv])


def cmd_export(args, _argv) -> None:
    from .export.config import ExportConfig
    from .export.run import export

    results = export(args.source, args.formats, out=args.out, data_dir=args.data_dir,
                     config=ExportConfig.from_args(args), trusted_factories=args.trust_factories)
    print(json.dumps(results, indent=2))


def cmd_bench(args, argv) -> None:
    from .bench.config import BenchConfig
    from .bench.run import bench

    bench(args.run_dir, BenchConfig.from_args(args), device=args.device, resume=args.resume,
          overwrite=args.overwrite, argv=["compress", *argv], trusted_factories=args.trust_factories)


def cmd_inspect(args, _argv) -> None:
    from . import checkpoint, surgery

    model, spec = checkpoint.load(args.checkpoint, with_spec=True, trusted_factories=args.trust_factories)
    cost = surgery.count(model, spec.example_inputs())
    print(json.dumps({"spec": asdict(spec), "macs": cost.macs, "params": cost.params}, indent=2))


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "export": cmd_export, "bench": cmd_bench, "analyze": cmd_analyze,
            "inspect": cmd_inspect}

EPILOG = """\
Options without a command mean `run`: `compress --method ffr --export trt`
is `compress run --method ffr --export trt`.

start here:
  compress run                 prune Conv-4 on the bundled digits to half its MACs (a minute on a CPU)
  compress run --model vgg16 --dataset cifar10 --budget-macs 0.5 --out runs/vgg16
  compress compare --dataset cifar10 --methods l1,ffr --budgets params:0.1 --seeds 3 --epochs 10 \\
      --pruning-epochs 5 --out studies/conv4    methods x budgets x seeds at equal epochs
  compress export runs/vgg16 --formats onnx,trt
  compress bench runs/vgg16 --backends eager,ort
  compress COMMAND --help      every option of a command
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compress", description="Structured pruning of CNNs, measured.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    _run_parser(sub)
    _compare_parser(sub)
    _export_parser(sub)
    _bench_parser(sub)
    _analyze_parser(sub)
    _inspect_parser(sub)
    parser.usage = f"%(prog)s [COMMAND] [options]   (COMMAND: {', '.join(COMMANDS)}; default run)"
    return parser


def with_command(argv: list[str]) -> list[str]:
    """``argv`` with ``run`` in front when it starts with an option other than --help: the default command."""
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        return ["run", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:  # bare `compress`: what there is to do, and the first command to try
        parser.print_help()
        return 0
    args = parser.parse_args(with_command(argv))
    if args.command != "run" and distributed.launched() and os.environ.get("RANK", "0") != "0":
        # export, bench, analyze and inspect do one process's work: under torchrun rank 0 does it
        print(f"compress {args.command}: rank {os.environ['RANK']} has nothing to do; rank 0 does the work")
        return 0
    try:
        COMMANDS[args.command](args, argv)
    except CompressorError as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compress: interrupted; finished files are complete, unfinished ones were not written; "
              "`compress run ... --resume` continues a run from its last saved epoch", file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
