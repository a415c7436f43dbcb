"""Prompt tuning (Lester et al., 2021): soft prompt embeddings before the text (peft ``PromptTuningConfig``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftguard.methods import MethodConfig, register_method


@register_method("prompt", summary="soft prompt embeddings", peft_type="PROMPT_TUNING", order=2)
@dataclass
class PromptMethodConfig(MethodConfig):
    lr: float = field(default=1e-1, metadata={"help": "learning rate"})
    num_virtual_tokens: int = field(default=5, metadata={"help": "soft prompt length (paper: 5)"})

    def peft_config(self, task_type: str = "SEQ_CLS") -> Any:
        from peft import PromptTuningConfig

        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=self.num_virtual_tokens)

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens
