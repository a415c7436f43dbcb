"""Fine-tuning methods: one module per method, each registering its config class once.

A method module defines a :class:`MethodConfig` subclass (its settings, with ``metadata={"help":
...}`` on each field, and the peft config it builds) and decorates it with :func:`register_method`;
the registry finds the module by itself. With every PEFT method the classification head trains too
(peft's ``modules_to_save`` for sequence classification), as in the paper's code.

Default learning rates are measured, not copied: the authors train every method at 2e-3 for 20
epochs; on CPU budgets (1-2k samples, 2 epochs) we measured dev accuracy of a fresh MiniLM head
per method and kept the rate that trained best (LoRA 3e-3: 0.82; Prompt 1e-1: 0.74;
P-tuning v1 1e-2: 0.69; P-tuning v2 3e-2: 0.68, against 1e-3/3e-2/3e-3/1e-2 at 0.70/0.60/0.67/0.66).

Method modules import peft inside ``peft_config`` only, so listing the methods (CLI help, config
validation) stays cheap.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peftguard.registries import Registry


@dataclass
class MethodConfig:
    """Settings shared by every method. ``lr`` is the default learning rate for the method."""

    lr: float = field(default=2e-5, metadata={"help": "learning rate"})

    def peft_config(self, task_type: str = "SEQ_CLS") -> Any:
        """The peft config of this method for ``task_type`` (peft's TaskType name); None: every weight trains."""
        return None

    @property
    def virtual_tokens(self) -> int:
        """Positions the method puts before the text (prompt methods), counted against --max-length."""
        return 0


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config: type[MethodConfig]
    summary: str
    peft_type: str | None  # ``peft_type`` in a saved adapter_config.json; None: whole model folders
    order: int  # column position in reports


METHODS: Registry[MethodEntry] = Registry("method", __name__)


def register_method(
    name: str, *, summary: str, peft_type: str | None, order: int
) -> Callable[[type[MethodConfig]], type[MethodConfig]]:
    """Class decorator: register a :class:`MethodConfig` subclass as the method ``name``."""

    def register(config: type[MethodConfig]) -> type[MethodConfig]:
        METHODS.register(MethodEntry(name, config, summary, peft_type, order))
        return config

    return register


def method_name(config: MethodConfig) -> str:
    """The registered name of ``config``'s method."""
    return next(name for name, entry in METHODS.items() if type(config) is entry.config)
