"""Process-wide caches, cleared through one public call.

Several modules keep what they computed once for the rest of the process (tokenized texts, loaded
datasets, built input defenses) and each built defense keeps a memo of the texts it scored. Benchmarks
that time a cold call, and long-lived processes that must free memory, call :func:`clear` and
:func:`forget` instead of reaching into each module. A module registers its cache's clearing
function beside the cache (:func:`register`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

_CLEARERS: dict[str, Callable[[], None]] = {}


def register(name: str, clear_function: Callable[[], None]) -> None:
    """Make :func:`clear` call ``clear_function`` (``name`` says whose cache it is; registering again replaces it)."""
    _CLEARERS[name] = clear_function


def registered() -> list[str]:
    """The names of the caches :func:`clear` empties (those of the modules imported so far)."""
    return sorted(_CLEARERS)


def clear() -> None:
    """Empty every registered process-wide cache."""
    for clear_function in _CLEARERS.values():
        clear_function()


def forget(*holders: Any) -> None:
    """Empty the memo of already scored texts of each built defense or detector in ``holders``.

    (A ``PSIM``, an ``OnionDefense``, a rewriting defense: a repeated call on the same texts would
    otherwise cost nothing.)
    """
    for holder in holders:
        memo = getattr(holder, "_memo", None)
        if memo is None:
            raise TypeError(f"{type(holder).__name__} keeps no memo of scored texts")
        memo.clear()
