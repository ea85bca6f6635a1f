"""One registry helper for every kind of named plug-in: criteria, models, export formats, bench backends.

In the manner of timm's ``@register_model``: a module registers what it provides where it
defines it, and the CLI, the pipeline and the docs read names, help and settings from the
registry, so adding one never adds an ``if`` anywhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import CompressorError


@dataclass(frozen=True)
class Entry:
    name: str
    target: Any  # the function or class registered
    info: dict = field(default_factory=dict)  # what the kind records beside it (a config class, a flag, ...)


class Registry:
    """Names to entries for one ``kind`` of thing; an unknown name is one clear error listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **info) -> Callable:
        """Decorator: register the decorated object as ``name``, with ``info`` beside it."""
        def wrap(target):
            self.add(name, target, **info)
            return target

        return wrap

    def add(self, name: str, target: Any, **info) -> Entry:
        self._entries[name] = Entry(name, target, info)
        return self._entries[name]

    def remove(self, name: str) -> None:
        """Forget ``name`` (a plug-in registered for a while, as tests do)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise CompressorError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter([self._entries[n] for n in self.names()])
