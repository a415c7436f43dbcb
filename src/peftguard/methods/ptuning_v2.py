"""P-tuning v2 (Liu et al., 2022): deep prompts, a prefix at each layer (peft ``PrefixTuningConfig``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftguard.methods import MethodConfig, register_method


@register_method("ptuning-v2", summary="deep prompts (a prefix at each layer)", peft_type="PREFIX_TUNING", order=4)
@dataclass
class PTuningV2Config(MethodConfig):
    lr: float = field(default=3e-2, metadata={"help": "learning rate"})
    num_virtual_tokens: int = field(default=5, metadata={"help": "prefix length per layer (paper: 5)"})

    def peft_config(self, task_type: str = "SEQ_CLS") -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=self.num_virtual_tokens)

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens
