"""Name → entry registries: one for fine-tuning methods, one for attacks, one for defenses.

Each thing registers itself once, beside its code (a ``register_*`` decorator in its own module,
in the spirit of peft's ``register_peft_method``), and a registry imports every module of its
package the first time it is read (``pkgutil``), so adding a module is enough to add a method, an
attack or a defense. Everything that lists names (CLI choices and help, config validation, report
order, manifest checks) reads them from here.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

from peftguard.errors import OptionError


class Entry(Protocol):
    name: str
    summary: str
    order: int


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    """Entries of one kind by name, in table order (``order``, then name).

    ``packages`` are imported module by module on the first read, so that every module that
    registers an entry has done so before anyone lists the names.
    """

    def __init__(self, kind: str, *packages: str) -> None:
        self.kind = kind
        self.packages = packages
        self._entries: dict[str, E] = {}
        self._discovered = False

    def register(self, entry: E) -> E:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} '{entry.name}' is registered twice")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Forget ``name`` (for tests that register a throwaway entry)."""
        self._entries.pop(name, None)

    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        for package_name in self.packages:
            package = importlib.import_module(package_name)
            for module in pkgutil.iter_modules(package.__path__, package_name + "."):
                importlib.import_module(module.name)

    def names(self) -> tuple[str, ...]:
        self._discover()
        return tuple(e.name for e in sorted(self._entries.values(), key=lambda e: (e.order, e.name)))

    def get(self, name: str) -> E:
        """The entry called ``name``; an unknown name is a one-line error listing the known ones."""
        self._discover()
        try:
            return self._entries[name]
        except KeyError:
            raise OptionError(f"unknown {self.kind} '{name}'; choose from {', '.join(self.names())}") from None

    def __getitem__(self, name: str) -> E:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def items(self) -> list[tuple[str, E]]:
        return [(name, self._entries[name]) for name in self.names()]

    def help(self) -> str:
        """``name: summary`` for each entry, for CLI help texts."""
        return "; ".join(f"{name} ({entry.summary})" for name, entry in self.items())
