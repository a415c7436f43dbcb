"""The range of every numeric option and setting, in one table.

The command line, the YAML configs, the manifests read from disk and the library's own checks
all read :data:`BOUNDS`, so a value means the same wherever it is given: finite, in range, and an
integer where an integer is meant. A NaN or infinite learning rate, a batch size of 0 or a gamma
of 1 is refused at the boundary, never trained on or silently turned into a detector that flags
nothing.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from peftguard.errors import OptionError


@dataclass(frozen=True)
class Bound:
    """A closed or open interval, integers only when ``integer``; None ends are unbounded."""

    integer: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        show = (lambda v: str(int(v))) if self.integer else (lambda v: f"{v:g}")
        low = f"[{show(self.ge)}" if self.ge is not None else f"({show(self.gt)}" if self.gt is not None else None
        high = f"{show(self.le)}]" if self.le is not None else f"{show(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"{kind} in {low}, {high}"
        if low:
            return f"{kind} {'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f"{kind} {'<=' if self.le is not None else '<'} {high[:-1]}"
        return kind

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def check(self, value: Any, name: str) -> None:
        """Raise a one-line :class:`OptionError` naming ``name`` unless ``value`` is in range."""
        if not self.admits(value):
            raise OptionError(f"{name} must be {self.describe()}, got {value!r}")

    def pydantic(self) -> dict[str, float]:
        """The interval as pydantic ``Field`` constraints (``allow_inf_nan=False`` makes it finite)."""
        return {k: v for k, v in (("ge", self.ge), ("gt", self.gt), ("le", self.le), ("lt", self.lt)) if v is not None}


# How many result cells `peftguard run` accepts from one config unless --max-cells says more.
MAX_CELLS = 2000


def _count(low: int = 1, high: int | None = None) -> Bound:
    return Bound(integer=True, ge=low, le=high)


UNIT_OPEN = Bound(gt=0, lt=1)
UNIT_CLOSED = Bound(ge=0, le=1)

# Keyed by the option's Python name (``--batch-size`` is ``batch_size``) and, for manifests and
# configs, by the setting's name. Upper ends guard against values that would exhaust memory
# (a 10^9-wide prompt encoder, 10^9 trigger words per sample) rather than fail cleanly.
BOUNDS: dict[str, Bound] = {
    "epochs": _count(1, 10_000),
    "poison_epochs": _count(1, 10_000),
    "psim_epochs": _count(1, 10_000),
    "max_epochs": _count(1, 10_000),
    "max_restarts": _count(0, 100),
    "lr": Bound(gt=0, le=1e3),
    "batch_size": _count(1, 1_000_000),
    "max_length": _count(8, 1_000_000),
    "seed": _count(0, 2**32 - 1),
    "max_train_samples": _count(1),
    "max_eval_samples": _count(1),
    "trigger_count": _count(1, 1_000),
    "target_label": _count(0),
    "poison_count": _count(1),
    "poison_rate": Bound(gt=0, le=1),
    "gamma": UNIT_OPEN,
    "target_fpr": Bound(ge=0, lt=1),
    "reset_rate": UNIT_CLOSED,
    "num_virtual_tokens": _count(1, 4_096),
    "encoder_hidden_size": _count(1, 65_536),
    "lora_r": _count(1, 4_096),
    "r": _count(1, 4_096),
    "alpha": _count(1, 1_000_000),
    "dropout": Bound(ge=0, lt=1),
    "mix_ratio": UNIT_CLOSED,
    "onion_bar": Bound(),
    "cpus_per_stage": _count(1, 4_096),
    "max_cells": _count(1),
    "top_k": _count(1, 1_000),
    "pairs": _count(0, 10_000_000),
    "proposals": _count(0, 100_000),
    "num_labels": _count(2, 1_000_000),
    "weight_decay": Bound(ge=0, le=1e3),
    "warmup_ratio": UNIT_CLOSED,
}


def bounded(name: str, default: Any = ..., **field: Any) -> Any:
    """A pydantic ``Field`` with the range ``BOUNDS[name]`` (models using it set ``allow_inf_nan=False``)."""
    from pydantic import Field

    return Field(default, **BOUNDS[name].pydantic(), **field)


def flag(name: str) -> str:
    """The command-line spelling of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def check_options(values: Mapping[str, Any]) -> None:
    """Check every value whose name has a bound (None means "not given"; lists are checked item by item).

    The CLI passes each command's parameters, so an option named like a bounded setting is checked
    before any file is read or any work starts.
    """
    for name, value in values.items():
        bound = BOUNDS.get(name)
        if bound is None or value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            bound.check(item, flag(name))
