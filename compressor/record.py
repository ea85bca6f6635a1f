"""A finished run's record: what ``metrics.json`` holds, typed and versioned.

``RunRecord.to_json()`` is the file's content: the keys it has always had, with ``"format"``
first. ``RunRecord.from_json`` reads one back and refuses, with one message, a file written
before records carried a format, one of another format, or one that lacks a field. Entries
other tools add to the file (``compress export`` adds ``export``) are kept as they are.

The same words refuse the other versioned files a run or a study reads back (``versioned``).
"""
from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from .errors import CompressorError

FORMAT = "compressor.run/1"  # a new or renamed field of the record means a new number
WHAT = "a finished run's record"


@dataclass
class Split:
    """Top-1 accuracy on the validation and test splits."""

    val: float
    test: float


@dataclass
class Accuracy:
    dense: Split
    pruned: Split  # right after surgery
    finetuned: Split  # the pruned model's, when fine-tuning trained no epoch


@dataclass
class Cost:
    """MACs or parameters: the dense and the pruned model's count, and the pruned one's fraction of the dense."""

    dense: float
    pruned: float
    fraction: float


@dataclass
class Epochs:
    dense: int
    criterion: int  # the criterion's own training
    finetune: int
    after_dense: int  # criterion + finetune: equal across a study's cells


@dataclass
class BudgetTarget:
    metric: str
    fraction: float
    tolerance: float


@dataclass
class Distill:
    weight: float
    temperature: float


@dataclass
class Widths:
    dense: dict[str, int]
    pruned: dict[str, int]


@dataclass
class Seconds:
    """Wall time of each stage in this process (a resumed run counts only the last one)."""

    data: float
    train: float
    plan: float
    surgery: float
    finetune: float
    total: float


@dataclass
class PerEpoch:
    train: float | None
    finetune: float | None


@dataclass
class History:
    train: list[dict]
    finetune: list[dict]


@dataclass(kw_only=True)
class RunRecord:
    status: str = "complete"
    resumed: bool  # if so, wall times count only the last process
    out: str
    date: str
    command: list[str] | None
    config: dict  # the RunConfig as the run used it (RunConfig's fields, criterion settings as a dict)
    training_defaults: dict
    model: str
    dataset: str
    method: str
    budget: BudgetTarget
    latency: dict | None = None  # a latency budget's target, prediction and measurement (latency.run_metrics)
    accuracy: Accuracy
    epochs: Epochs
    distill: Distill | None
    macs: Cost
    params: Cost
    widths: Widths
    criterion: dict  # what the criterion found (its report)
    seconds: Seconds
    seconds_per_epoch: PerEpoch
    history: History
    device: str
    versions: dict
    export: dict | None = None  # compress export's results, added to a finished run's file
    extra: dict = field(default_factory=dict)  # other entries a tool added to the file, kept as they are

    def to_json(self) -> dict:
        """metrics.json's content."""
        found = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        data = {k: asdict(v) if is_dataclass(v) else v for k, v in found.items()
                if not (v is None and k in ("latency", "export"))}  # absent, as before, when there is none
        return {"format": FORMAT, **data, **self.extra}

    @classmethod
    def from_json(cls, data: dict, path: str | Path,
                  fix: str = "run it again with --overwrite to rewrite it, or read it with the compressor that "
                             "wrote it") -> RunRecord:
        """The record in ``data`` (read from ``path``), or one CompressorError naming the file, the format
        found and the one expected, and ``fix``."""
        where = f"{path}"
        check_format(data, FORMAT, where, WHAT, fix)
        try:
            return _build(cls, {k: v for k, v in data.items() if k != "format"}, "")
        except _Bad as bad:
            raise versioned(where, WHAT, FORMAT, f"{FORMAT!r} {bad}", fix) from None


def versioned(path: str | Path, what: str, expected: str, found: str, fix: str) -> CompressorError:
    """The one message for a file of the toolkit's that this version does not read."""
    return CompressorError(f"{path} is not {what} this version of compressor reads (format {expected!r} expected; "
                           f"found {found}); {fix}")


def check_format(data, expected: str, path: str | Path, what: str, fix: str) -> None:
    """Refuse ``data`` (a JSON object read from ``path``) unless its ``"format"`` is ``expected``."""
    found = data.get("format", MISSING) if isinstance(data, dict) else MISSING
    if found is MISSING:
        raise versioned(path, what, expected, "no format: written before these files were versioned"
                        if isinstance(data, dict) else "no JSON object", fix)
    if found != expected:
        raise versioned(path, what, expected, repr(found), fix)


class _Bad(Exception):
    """A field missing or of the wrong kind: its dotted name and what is wrong."""


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise _Bad(f"with {where!r} of the wrong kind ({type(data).__name__}, not an object)")
    hints = typing.get_type_hints(cls)
    known, kwargs = {f.name for f in fields(cls)}, {}
    for f in fields(cls):
        name = f"{where}.{f.name}" if where else f.name
        if f.name == "extra":
            kwargs["extra"] = {k: v for k, v in data.items() if k not in known}
        elif f.name in data:
            kwargs[f.name] = _value(hints[f.name], data[f.name], name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise _Bad(f"without its field {name!r}")
    if where and set(data) - known:  # a nested entry's fields are the format's: any other is another format's
        raise _Bad(f"with a field {where}.{sorted(set(data) - known)[0]} it does not define")
    return cls(**kwargs)


_KINDS = {float: (int, float), int: (int,), str: (str,), bool: (bool,), dict: (dict,), list: (list,)}


def _value(kind, value, name: str):
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None and type(None) in options:
        return None
    for option in (o for o in options if o is not type(None)):
        if is_dataclass(option):
            return _build(option, value, name)
        base = typing.get_origin(option) or option
        if isinstance(value, _KINDS[base]) and (base is bool or not isinstance(value, bool)):
            return value
    raise _Bad(f"with {name!r} of the wrong kind ({type(value).__name__})")


__all__ = ["FORMAT", "RunRecord", "Accuracy", "Split", "Cost", "Epochs", "BudgetTarget", "Distill", "Widths",
           "Seconds", "PerEpoch", "History", "check_format", "versioned"]
