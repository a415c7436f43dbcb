"""P-tuning v1 (Liu et al., 2021): a prompt from an MLP prompt encoder (peft ``PromptEncoderConfig``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftguard.methods import MethodConfig, register_method


@register_method("ptuning-v1", summary="prompt from an MLP prompt encoder", peft_type="P_TUNING", order=3)
@dataclass
class PTuningV1Config(MethodConfig):
    lr: float = field(default=1e-2, metadata={"help": "learning rate"})
    num_virtual_tokens: int = field(default=5, metadata={"help": "prompt length (paper: 5)"})
    encoder_hidden_size: int = field(default=128, metadata={"help": "prompt encoder MLP width (paper: 128)"})

    def peft_config(self, task_type: str = "SEQ_CLS") -> Any:
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(
            task_type=task_type,
            num_virtual_tokens=self.num_virtual_tokens,
            encoder_hidden_size=self.encoder_hidden_size,
        )

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens
