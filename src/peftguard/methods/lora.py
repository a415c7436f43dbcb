"""LoRA (Hu et al., 2022): low-rank updates of the attention projections (peft ``LoraConfig``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peftguard.methods import MethodConfig, register_method


@register_method("lora", summary="low-rank updates of query/value", peft_type="LORA", order=1)
@dataclass
class LoraMethodConfig(MethodConfig):
    lr: float = field(default=3e-3, metadata={"help": "learning rate"})
    r: int = field(default=8, metadata={"help": "rank of the update matrices (paper: 8)"})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA path (paper: 0.1)"})
    target_modules: tuple[str, ...] | None = field(default=None, metadata={
        "help": "layers LoRA adapts, by name (e.g. query,value); default: derived from the architecture "
                "(peftguard.architectures); the adapter's adapter_config.json lists the ones used"})

    def __post_init__(self) -> None:
        from peftguard.architectures import lora_target_names

        self.target_modules = lora_target_names(self.target_modules)

    def peft_config(self, task_type: str = "SEQ_CLS") -> Any:
        from peft import LoraConfig

        # target_modules=None: tuning.make_tunable derives them per architecture (peftguard.architectures).
        return LoraConfig(task_type=task_type, r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules) if self.target_modules else None)
