"""Settings declared once: a frozen dataclass whose fields are :func:`option` s.

Each option carries its default, help, CLI flag and range where the settings live. A
:class:`Settings` subclass checks every field when it is built (numbers with
:func:`compressor.checks.number`, names against their ``choices``, then the class's own ``check``
for what spans fields), so Python and the command line refuse a bad value with the same words;
:meth:`Settings.add_arguments` makes the argparse options from the fields and
:meth:`Settings.from_args` builds the settings back from the parsed command line. Criteria
(:class:`compressor.criteria.CriterionConfig`), export (:class:`compressor.export.config.ExportConfig`)
and the benchmark (:class:`compressor.bench.config.BenchConfig`) declare theirs this way.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from .checks import choice, number
from .errors import CompressorError


def option(default: Any, help: str | Callable[[], str] | None, *, flag: str, low=None, high=None,
           low_open: bool = False, high_open: bool = False, integer: bool = False, optional: bool = False,
           choices: tuple | None = None, cli: bool = True, shown_default: str | None = None, dest: str | None = None,
           metavar: str | None = None, parse_check: bool = False):
    """A setting: its default, help, CLI flag and range, declared once where the settings live.

    Numbers are checked with :func:`compressor.checks.number` (so the API and the CLI refuse alike),
    names against ``choices``; a setting with neither (a list of levels) checks itself in its class's
    ``check``, which may accept the CLI's text. A ``bool`` default is a switch: ``--flag`` sets the
    other value. ``cli=False``: an API-only setting, no flag (``flag`` names it in messages).
    ``help``: text, or a function giving it when the parser is built (a registry's names).
    ``shown_default``: the help's words for a default worked out at run time (a ``None`` default).
    ``dest``: the argparse destination (default: the flag's name). ``parse_check``: the range is also
    checked as the command line is read (argparse's usage error) rather than when the settings are built.
    """
    meta = {"help": help, "flag": flag, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "integer": integer, "optional": optional, "choices": choices, "cli": cli, "shown_default": shown_default,
            "dest": dest, "metavar": metavar, "parse_check": parse_check}
    return field(default=default, metadata={"option": meta})


def shown_default(f: dataclasses.Field) -> str:
    """A setting's default as the help shows it."""
    return f.metadata["option"]["shown_default"] or str(f.default)


def flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def dest(f: dataclasses.Field) -> str:
    """Where argparse puts a setting's value."""
    meta = f.metadata["option"]
    return meta["dest"] or flag_dest(meta["flag"])


def help_text(f: dataclasses.Field) -> str | None:
    text = f.metadata["option"]["help"]
    return text() if callable(text) else text


def _checked(meta: dict, kind: type) -> Callable[[str], Any]:
    """An argparse type that reads a number and checks its range as the command line is read."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{meta['flag']} must be a "
                                             f"{'whole number' if kind is int else 'number'}, got {text!r}") from None
        try:
            return number(meta["flag"], value, integer=meta["integer"], low=meta["low"], high=meta["high"],
                          low_open=meta["low_open"], high_open=meta["high_open"])
        except CompressorError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def add_argument(group, f: dataclasses.Field, help: str | None = None, **kwargs) -> None:
    """Add the setting ``f`` to an argparse ``group`` (``help``: other words than its own; ``kwargs``: argparse's)."""
    meta = f.metadata["option"]
    text = help_text(f) if help is None else help
    kwargs.setdefault("default", f.default)
    kwargs |= {"dest": dest(f), "help": None if text is None else text.replace("%", "%%")}
    if isinstance(f.default, bool):
        group.add_argument(meta["flag"], action="store_false" if f.default else "store_true", **kwargs)
        return
    # text the settings parse themselves (levels, batch sizes) stays text: their check gives the one-line error
    kind = int if meta["integer"] else float if meta["low"] is not None or meta["high"] is not None else str
    group.add_argument(meta["flag"], type=_checked(meta, kind) if meta["parse_check"] else kind,
                       choices=meta["choices"], metavar=meta["metavar"], **kwargs)


@dataclass(frozen=True)
class Settings:
    """Settings whose fields are :func:`option` s; every one is checked when built, then :meth:`check`."""

    def __post_init__(self):
        for f in fields(self):
            meta = f.metadata.get("option")
            if meta is None:
                continue
            value = getattr(self, f.name)
            if meta["choices"] is not None:
                choice(meta["flag"], value, meta["choices"])
            elif meta["integer"] or meta["low"] is not None or meta["high"] is not None:
                number(meta["flag"], value, integer=meta["integer"], low=meta["low"], high=meta["high"],
                       low_open=meta["low_open"], high_open=meta["high_open"], optional=meta["optional"])
        self.check()

    def check(self) -> None:
        """Checks across fields, or beyond a range (a subclass's own); may normalise a field
        (``object.__setattr__``: the settings are frozen)."""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        """The settings that have a flag."""
        return [f for f in fields(cls) if f.metadata.get("option", {}).get("cli")]

    @classmethod
    def add_arguments(cls, group) -> None:
        """Every setting with a flag, in declaration order, with its own help."""
        for f in cls.options():
            add_argument(group, f)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The settings from a parsed command line (a flag not on this parser keeps its default)."""
        return cls(**{f.name: getattr(args, dest(f)) for f in cls.options() if hasattr(args, dest(f))})

    @classmethod
    def given(cls, settings=None, **overrides):
        """``settings`` (default: the defaults) with ``overrides`` by field name, checked: what a function
        that takes the settings object or its fields as keywords builds."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; {cls.__name__} has "
                            f"{', '.join(sorted(names))}")
        settings = cls() if settings is None else settings
        if not isinstance(settings, cls):
            raise CompressorError(f"expected {cls.__name__} settings, not a {type(settings).__name__}")
        return dataclasses.replace(settings, **overrides) if overrides else settings

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["option"]["cli"]}
