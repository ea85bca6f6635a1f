"""The ``compress`` command. Subcommands stay thin: the work lives in the library."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from . import criteria, models
from .errors import CompressorError
from .pipeline import RunConfig, run


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train or load a model, prune it to a budget, fine-tune, save",
                       description="Train (or load) -> prune with a criterion -> fine-tune -> write a run directory.")
    p.add_argument("--model", default="conv4",
                   help=f"registry name ({', '.join(models.available())}) or 'module.path:factory' (default conv4)")
    p.add_argument("--dataset", default="digits",
                   help="digits, synthetic, mnist, cifar10, cifar100, or an ImageFolder name/path (default digits)")
    p.add_argument("--method", default="l1", help=f"pruning criterion: {', '.join(criteria.available())} (default l1)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget-macs", type=float, metavar="F", help="fraction of MACs to keep (default 0.5)")
    budget.add_argument("--budget-params", type=float, metavar="F", help="fraction of parameters to keep")
    p.add_argument("--epochs", type=int, help="dense training epochs (default 15, or 0 with --checkpoint)")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--checkpoint", help="start from this trained checkpoint instead of training from scratch")
    p.add_argument("--data-dir", help="where data sets live or download to (default ./data)")
    p.add_argument("--out", help="run directory (default runs/<model>-<dataset>-<method>-<budget>-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace the run files in a non-empty --out")
    p.add_argument("--round-to", type=int, default=8, help="remaining widths are multiples of this (default 8)")
    p.add_argument("--max-ratio", type=float, default=0.95, help="most of any one group that may be removed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of dense training")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--schedule", default="onecycle", choices=["onecycle", "cosine"])
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out for scoring")


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="print a checkpoint's architecture spec, MACs and parameters")
    p.add_argument("checkpoint")


def cmd_run(args, argv) -> None:
    metric, fraction = ("params", args.budget_params) if args.budget_params is not None else ("macs", args.budget_macs)
    fields = {k: v for k, v in vars(args).items() if k in RunConfig.__dataclass_fields__}
    run(RunConfig(**fields, budget_metric=metric, budget=0.5 if fraction is None else fraction,
                  argv=["compress", *argv]))


def cmd_inspect(args, _argv) -> None:
    from . import checkpoint, surgery

    model, spec = checkpoint.load(args.checkpoint, with_spec=True)
    cost = surgery.count(model, spec.example_inputs())
    print(json.dumps({"spec": asdict(spec), "macs": cost.macs, "params": cost.params}, indent=2))


COMMANDS = {"run": cmd_run, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="compress", description="Structured pruning of CNNs, measured.")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _inspect_parser(sub)
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command](args, argv)
    except CompressorError as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compress: interrupted; finished files are complete, unfinished ones were not written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
