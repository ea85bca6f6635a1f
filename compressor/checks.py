"""Checks of the numbers a user gives, shared by the API and the CLI.

Each check raises one :class:`CompressorError` naming the option, its allowed range and
the value given, so a bad number stops a job before any data is read or any epoch is
spent, with the same words whether it came from ``compress`` or from Python.
"""
from __future__ import annotations

import math
import numbers

from .errors import CompressorError


def _show(bound) -> str:
    return str(bound) if isinstance(bound, numbers.Integral) else f"{bound:g}"


def number(name: str, value, *, integer: bool = False, low=None, high=None, low_open: bool = False,
           high_open: bool = False, optional: bool = False):
    """``value`` if it is a finite number (a whole one with ``integer``) within the bounds; else one clear error.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``optional`` lets ``None`` through.
    """
    if value is None and optional:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        raise CompressorError(f"{name} must be a {'whole number' if integer else 'number'}, got {value!r}")
    if not integer and not math.isfinite(value):
        raise CompressorError(f"{name} must be a finite number, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if low is not None and high is not None:
            span = f"{'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"
            raise CompressorError(f"{name} must lie in {span}, got {value}")
        if low is not None:
            raise CompressorError(f"{name} must be {'greater than' if low_open else 'at least'} {_show(low)}, "
                                  f"got {value}")
        raise CompressorError(f"{name} must be {'less than' if high_open else 'at most'} {_show(high)}, got {value}")
    return value


def choice(name: str, value, options) -> str:
    """``value`` if it is one of ``options``; else one clear error listing them."""
    if value not in options:
        raise CompressorError(f"{name} must be one of {', '.join(options)}, not {value!r}")
    return value
