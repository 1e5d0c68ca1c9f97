"""Name -> object registries filled by a decorator (scorers, selectors, models, datasets).

One registry per kind; a duplicate name is a programming error, an unknown name is a user
error that lists the known names, so the CLI can print it as is.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict, Generic, Iterable, Iterator, TypeVar

from engine.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A dict of named objects of one kind, e.g. ``SCORERS = Registry("scorer")``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@SCORERS.register("el2n")``. Raises on a duplicate name."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def entries(self) -> list[T]:
        """The registered objects, in name order."""
        return [self._items[n] for n in sorted(self._items)]


def import_submodules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> None:
    """Import every module of ``package`` (give its ``__name__`` and ``__path__``), in name
    order, except private ones (``_x``) and those in ``skip``. A module that defines methods
    registers them when it is imported, so adding a scorer, selector, model or data source is
    adding one file to its package."""
    skip = set(skip)
    for info in sorted(pkgutil.iter_modules(list(path)), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
