"""Named extension points: substrate kinds, combine rules and eval tasks are each a :class:`Registry`.

An entry is registered by name from the module that defines it (one line), and everything that
offers a choice (the plan's validation, the CLI's ``choices``, error messages) reads the registry,
so adding one is one new module and one ``register`` call. See ``docs/extending.md``.

This module imports nothing heavy: the CLI builds its parser from :meth:`Registry.choices`
without importing torch; the built-in entries are imported the first time a registry is read.

Plugins: a pip-installed package that names a module in the ``growlm.plugins`` entry-point group
(``[project.entry-points."growlm.plugins"] NAME = "its_module"``) has that module imported the first
time any registry is read, after the built-ins, so its registrations are there for every command
(and a saved substrate or mixture of its kind loads) with no import of the user's own.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from growlm.errors import GrowlmError

T = TypeVar("T")
PLUGIN_GROUP = "growlm.plugins"


def load_plugins() -> tuple[str, ...]:
    """Import every module named in the ``growlm.plugins`` entry-point group; returns their entry names.
    A plugin that fails to import is one line naming it (its registrations would otherwise be missing
    silently), the same line every time it is asked for."""
    names, error = _import_plugins()
    if error is not None:
        raise GrowlmError(error)
    return names


@functools.cache  # once per process: a plugin's import registers its entries (a failed one may have registered
def _import_plugins() -> tuple[tuple[str, ...], str | None]:  # some already), and a name registers once
    names = []
    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            ep.load()
        except Exception as e:  # whatever a third-party import raises, it is reported as the plugin's
            return tuple(names), f"growlm plugin {ep.name!r} ({ep.value}) failed to load: {type(e).__name__}: {e}"
        names.append(ep.name)
    return tuple(names), None


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order (the built-ins first).

    ``what`` names the kind in errors ("substrate kind"); ``builtins`` is the module whose import
    registers the built-in entries, imported on first read (so a registry can be read from a
    module that the built-ins themselves import).
    """

    def __init__(self, what: str, builtins: str) -> None:
        self.what = what
        self._builtins = builtins
        self._entries: dict[str, T] = {}

    def _load(self) -> dict[str, T]:
        importlib.import_module(self._builtins)
        load_plugins()
        return self._entries

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name``; a name is registered once (unregister it first to replace it)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a no-op when it is not registered)."""
        self._entries.pop(name, None)

    @contextmanager
    def registered(self, name: str, entry: T) -> Iterator[T]:
        """``register`` for the duration of a ``with`` block (tests: nothing leaks into the next one)."""
        self.register(name, entry)
        try:
            yield entry
        finally:
            self.unregister(name)

    def get(self, name: str) -> T | None:
        """The entry registered as ``name``, or None."""
        return self._load().get(name)

    def names(self) -> tuple[str, ...]:
        """Every registered name, built-ins first."""
        return tuple(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> T:
        return self._load()[name]


class Choices:
    """argparse ``choices`` read from a :class:`Registry` only when argparse checks a value or prints
    help, so that the parser builds without importing torch (see :func:`registered`)."""

    def __init__(self, module: str, attr: str, keep: Callable[[Any], bool] | None = None,
                 first: tuple[str, ...] = ()) -> None:
        self._where = (module, attr)
        self._keep = keep
        self._first = first

    def _names(self) -> list[str]:
        registry: Registry = getattr(importlib.import_module(self._where[0]), self._where[1])
        return [*self._first, *(n for n in registry.names() if self._keep is None or self._keep(registry.get(n)))]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def registered(module: str, attr: str, keep: Callable[[Any], bool] | None = None, *,
               first: tuple[str, ...] = ()) -> Choices:
    """argparse ``choices``: ``first``, then the names in the registry ``module.attr`` whose entry passes ``keep``.

    Give the argument a ``metavar``: without one argparse lists the choices as soon as it is added.
    """
    return Choices(module, attr, keep, first)
