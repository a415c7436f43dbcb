"""Fine-tuning methods: one small config per method, one registry from name to config.

The five strategies the paper compares, over HF peft where peft has them:

==============  =====================================  ===================================
name            what trains                            peft config
==============  =====================================  ===================================
full            every weight                           (none)
lora            low-rank updates of query/value        ``LoraConfig``
prompt          soft prompt embeddings                 ``PromptTuningConfig``
ptuning-v1      prompt from an MLP prompt encoder      ``PromptEncoderConfig``
ptuning-v2      deep prompts (a prefix at each layer)  ``PrefixTuningConfig``
==============  =====================================  ===================================

With every PEFT method the classification head trains too (peft's ``modules_to_save`` for
sequence classification), as in the paper's code.

Default learning rates are measured, not copied: the authors train every method at 2e-3 for 20
epochs; on CPU budgets (1-2k samples, 2 epochs) we measured dev accuracy of a fresh MiniLM head
per method and kept the rate that trained best (LoRA 3e-3: 0.82; Prompt 1e-1: 0.74;
P-tuning v1 1e-2: 0.69; P-tuning v2 3e-2: 0.68, against 1e-3/3e-2/3e-3/1e-2 at 0.70/0.60/0.67/0.66).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from peft import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    get_peft_model,
)
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftguard.artifacts import atomic_dir, read_json, write_json
from peftguard.errors import OptionError, PeftguardError, UnsafeCheckpointError
from peftguard.instruction import LabelWordClassifier, read_template
from peftguard.models import LoadOptions, load_classifier, load_tokenizer


class Method(str, Enum):
    FULL = "full"
    LORA = "lora"
    PROMPT = "prompt"
    PTUNING_V1 = "ptuning-v1"
    PTUNING_V2 = "ptuning-v2"


@dataclass
class MethodConfig:
    """Settings shared by every method. ``lr`` is the default learning rate for the method."""

    lr: float = field(default=2e-5, metadata={"help": "learning rate"})

    def peft_config(self, task_type: TaskType = TaskType.SEQ_CLS) -> PeftConfig | None:
        return None

    @property
    def virtual_tokens(self) -> int:
        return 0


@dataclass
class FullConfig(MethodConfig):
    lr: float = field(default=2e-5, metadata={"help": "learning rate (all weights train)"})


@dataclass
class LoraMethodConfig(MethodConfig):
    lr: float = field(default=3e-3, metadata={"help": "learning rate"})
    r: int = field(default=8, metadata={"help": "rank of the update matrices (paper: 8)"})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the LoRA path (paper: 0.1)"})

    def peft_config(self, task_type: TaskType = TaskType.SEQ_CLS) -> PeftConfig:
        # target_modules=None lets peft pick the attention projections per architecture
        # (query/value for BERT, q_proj/v_proj for LLaMA).
        return LoraConfig(task_type=task_type, r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout)


@dataclass
class PromptMethodConfig(MethodConfig):
    lr: float = field(default=1e-1, metadata={"help": "learning rate"})
    num_virtual_tokens: int = field(default=5, metadata={"help": "soft prompt length (paper: 5)"})

    def peft_config(self, task_type: TaskType = TaskType.SEQ_CLS) -> PeftConfig:
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=self.num_virtual_tokens)

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens


@dataclass
class PTuningV1Config(MethodConfig):
    lr: float = field(default=1e-2, metadata={"help": "learning rate"})
    num_virtual_tokens: int = field(default=5, metadata={"help": "prompt length (paper: 5)"})
    encoder_hidden_size: int = field(default=128, metadata={"help": "prompt encoder MLP width (paper: 128)"})

    def peft_config(self, task_type: TaskType = TaskType.SEQ_CLS) -> PeftConfig:
        return PromptEncoderConfig(
            task_type=task_type,
            num_virtual_tokens=self.num_virtual_tokens,
            encoder_hidden_size=self.encoder_hidden_size,
        )

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens


@dataclass
class PTuningV2Config(MethodConfig):
    lr: float = field(default=3e-2, metadata={"help": "learning rate"})
    num_virtual_tokens: int = field(default=5, metadata={"help": "prefix length per layer (paper: 5)"})

    def peft_config(self, task_type: TaskType = TaskType.SEQ_CLS) -> PeftConfig:
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=self.num_virtual_tokens)

    @property
    def virtual_tokens(self) -> int:
        return self.num_virtual_tokens


METHOD_CONFIGS: dict[Method, type[MethodConfig]] = {
    Method.FULL: FullConfig,
    Method.LORA: LoraMethodConfig,
    Method.PROMPT: PromptMethodConfig,
    Method.PTUNING_V1: PTuningV1Config,
    Method.PTUNING_V2: PTuningV2Config,
}


def method_config(method: Method | str, **overrides: Any) -> MethodConfig:
    """The config of ``method`` with the given fields changed; unknown fields are an error."""
    cls = METHOD_CONFIGS[Method(method)]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise OptionError(f"method '{Method(method).value}' has no setting {unknown}; it has {sorted(known)}")
    return cls(**{k: v for k, v in overrides.items() if v is not None})


def make_tunable(model: PreTrainedModel, config: MethodConfig) -> PreTrainedModel | PeftModel:
    """Wrap ``model`` for training with ``config``'s method (full: every weight trains)."""
    label_words = isinstance(model, LabelWordClassifier)
    # A label-word classifier's PEFT module goes on the causal LM inside it; its LM head scores the words.
    peft_config = config.peft_config(TaskType.CAUSAL_LM if label_words else TaskType.SEQ_CLS)
    if label_words and peft_config is not None:
        model.lm = get_peft_model(model.lm, peft_config)
        return model
    if peft_config is None:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    return get_peft_model(model, peft_config)


def trainable_share(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --- saving and loading tuned models ---------------------------------------------------------

def save_tuned(
    model: Any, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, manifest_name: str, manifest: dict[str, Any]
) -> None:
    """Save a fully tuned model folder or a peft adapter folder, with its manifest written last."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / manifest_name, manifest)


def load_tuned(
    folder: str | Path, manifest_name: str, options: LoadOptions = LoadOptions()
) -> tuple[Any, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load what :func:`save_tuned` wrote: (model in eval mode, tokenizer, manifest)."""
    folder = Path(folder)
    manifest_path = folder / manifest_name
    if not manifest_path.is_file():
        raise PeftguardError(f"{folder}: not a peftguard artifact (no {manifest_name})")
    manifest = read_json(manifest_path)
    num_labels = int(manifest["num_labels"])
    if manifest["method"] == Method.FULL.value:
        model = load_classifier(str(folder), num_labels, options)
    else:
        check_adapter_folder(folder, manifest, options)
        base = load_classifier(manifest["base_model"], num_labels, options, template=read_template(folder))
        if isinstance(base, LabelWordClassifier):
            base.lm = PeftModel.from_pretrained(base.lm, folder)
            model = base
        else:
            model = PeftModel.from_pretrained(base, folder)
    model.eval()
    return model, load_tokenizer(str(folder), options), manifest


def check_adapter_folder(folder: Path, manifest: dict[str, Any], options: LoadOptions) -> None:
    if not (folder / "adapter_model.safetensors").is_file():
        if (folder / "adapter_model.bin").is_file() and not options.allow_pickle:
            raise UnsafeCheckpointError(
                f"{folder}: refusing pickled adapter adapter_model.bin (unpickling can run code); "
                "convert it to safetensors or pass --allow-pickle"
            )
        if not (folder / "adapter_model.bin").is_file():
            raise PeftguardError(f"{folder}: no adapter weights (adapter_model.safetensors)")
    config = read_json(folder / "adapter_config.json")
    expected = {Method.LORA.value: "LORA", Method.PROMPT.value: "PROMPT_TUNING",
                Method.PTUNING_V1.value: "P_TUNING", Method.PTUNING_V2.value: "PREFIX_TUNING"}[manifest["method"]]
    if config.get("peft_type") != expected:
        raise PeftguardError(
            f"{folder}: adapter type {config.get('peft_type')} does not match method {manifest['method']}"
        )


def method_name(config: MethodConfig) -> str:
    return next(method.value for method, cls in METHOD_CONFIGS.items() if type(config) is cls)
