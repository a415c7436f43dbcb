"""IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale the keys, values and feed-forward activations (peft ``IA3Config``).

Not one of the paper's five methods: it is here to show that a method is one module. peft picks the
rescaled modules per architecture (key/value/output.dense for BERT). The learning rate is the IA3
paper's 3e-3, not measured here as the five others' were.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftguard.methods import MethodConfig, register_method


@register_method("ia3", summary="learned rescaling of keys, values and feed-forward activations", peft_type="IA3", order=5)
@dataclass
class IA3MethodConfig(MethodConfig):
    lr: float = field(default=3e-3, metadata={"help": "learning rate (the IA3 paper's)"})

    def peft_config(self, task_type: str = "SEQ_CLS") -> Any:
        from peft import IA3Config

        return IA3Config(task_type=task_type)
