"""One registry per kind of plug-in (strategies, buffer aggregators, staleness weights, server
optimizers, codecs): settings choices, command-line choices, help text and errors all read it.

Registering is one decorator on the plug-in's class (or function) in its own module; the name it
is registered under is what users type, and a registered class carries it as ``name``.
"""

from __future__ import annotations

import inspect
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownChoice(ValueError):
    """A name no plug-in of the kind is registered under; the message lists those that are."""


class Registry(Generic[T]):
    """Plug-ins of one ``kind`` by name, in the order they were registered."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the plug-in under ``name``."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            if isinstance(entry, type):
                entry.name = name
            self._entries[name] = entry
            return entry

        return add

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownChoice(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}") from None

    def check(self, name: str) -> str:
        """``name`` if a plug-in is registered under it (a settings validator); UnknownChoice otherwise."""
        self[name]
        return name

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def summary(self, name: str) -> str:
        """The first line of the plug-in's docstring, without its final full stop."""
        doc = inspect.getdoc(self._entries[name]) or ""
        return doc.split("\n\n")[0].replace("\n", " ").rstrip(".")
