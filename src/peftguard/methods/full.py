"""Full fine-tuning: every weight trains (no peft config)."""
from __future__ import annotations

from dataclasses import dataclass, field

from peftguard.methods import MethodConfig, register_method


@register_method("full", summary="every weight trains", peft_type=None, order=0)
@dataclass
class FullConfig(MethodConfig):
    lr: float = field(default=2e-5, metadata={"help": "learning rate (all weights train)"})
