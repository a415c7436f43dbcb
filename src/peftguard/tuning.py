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

import copy
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

from peftguard.architectures import LORA_TARGETS_FLAG, fit_peft_config, lora_target_names
from peftguard.artifacts import atomic_dir, read_json, write_json
from peftguard.bounds import BOUNDS, flag
from peftguard.errors import OptionError, PeftguardError, UnsafeCheckpointError
from peftguard.instruction import LabelWordClassifier, read_template
from peftguard.manifests import read_manifest
from peftguard.models import LoadOptions, check_contained, check_safetensors_header, load_classifier, load_tokenizer


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
    target_modules: tuple[str, ...] | None = field(default=None, metadata={
        "help": "layers LoRA adapts, by name (e.g. query,value); default: derived from the architecture "
                "(peftguard.architectures); the adapter's adapter_config.json lists the ones used"})

    def __post_init__(self) -> None:
        self.target_modules = lora_target_names(self.target_modules)

    def peft_config(self, task_type: TaskType = TaskType.SEQ_CLS) -> PeftConfig:
        # target_modules=None: fit_peft_config derives them per architecture (make_tunable).
        return LoraConfig(task_type=task_type, r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules) if self.target_modules else None)


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


# The command-line flag of a method setting, where it is not simply --<name>.
SETTING_FLAGS = {"r": "--lora-r", "target_modules": LORA_TARGETS_FLAG}


def method_config(method: Method | str, **overrides: Any) -> MethodConfig:
    """The config of ``method`` with the given fields changed; unknown fields and values out of range are errors."""
    cls = METHOD_CONFIGS[Method(method)]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise OptionError(f"method '{Method(method).value}' has no setting {unknown}; it has {sorted(known)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    for name, value in given.items():
        if name in BOUNDS:
            BOUNDS[name].check(value, SETTING_FLAGS.get(name, flag(name)))
    return cls(**given)


def make_tunable(model: PreTrainedModel, config: MethodConfig) -> PreTrainedModel | PeftModel:
    """Wrap ``model`` for training with ``config``'s method (full: every weight trains)."""
    label_words = isinstance(model, LabelWordClassifier)
    # A label-word classifier's PEFT module goes on the causal LM inside it; its LM head scores the words.
    peft_config = fit_peft_config(model.lm if label_words else model,
                                  config.peft_config(TaskType.CAUSAL_LM if label_words else TaskType.SEQ_CLS), method_name(config))
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
        _forget_last_call(tokenizer)
        tokenizer.save_pretrained(tmp)
        _sort_adapter_module_sets(tmp / "adapter_config.json")
        write_json(tmp / manifest_name, manifest)


def _forget_last_call(tokenizer: Any) -> None:
    """A fast tokenizer saves the truncation and padding of its last call into tokenizer.json; with
    cached encodings that depends on what ran before in the process. Save it without either."""
    backend = getattr(getattr(tokenizer, "inner", tokenizer), "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()


def _sort_adapter_module_sets(path: Path) -> None:
    """peft writes ``target_modules`` from a set, in hash order: sort it so equal runs give equal bytes."""
    if not path.is_file():
        return
    config = read_json(path)
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list) and all(isinstance(v, str) for v in config[key]):
            config[key] = sorted(config[key])
    write_json(path, config)


def load_tuned(
    folder: str | Path, manifest_name: str, options: LoadOptions = LoadOptions()
) -> tuple[Any, PreTrainedTokenizerBase, dict[str, Any]]:
    """Load what :func:`save_tuned` wrote: (model in eval mode, tokenizer, manifest).

    The manifest is validated (:mod:`peftguard.manifests`) and the folder checked for symlinks
    leading out of it before anything else is read.
    """
    folder = Path(folder)
    manifest_path = folder / manifest_name
    if not manifest_path.is_file():
        raise PeftguardError(f"{folder}: not a peftguard artifact (no {manifest_name})")
    check_contained(folder)
    manifest = read_manifest(manifest_path)
    num_labels = int(manifest["num_labels"])
    if manifest["method"] == Method.FULL.value:
        model = load_classifier(str(folder), num_labels, options)
    else:
        check_adapter_folder(folder, manifest, options)
        base = load_classifier(manifest["base_model"], num_labels, options, template=read_template(folder))
        if isinstance(base, LabelWordClassifier):
            base.lm = attach_adapter(folder, base.lm, manifest)
            model = base
        else:
            model = attach_adapter(folder, base, manifest)
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
    config = read_manifest(folder / "adapter_config.json")
    expected = {Method.LORA.value: "LORA", Method.PROMPT.value: "PROMPT_TUNING",
                Method.PTUNING_V1.value: "P_TUNING", Method.PTUNING_V2.value: "PREFIX_TUNING"}[manifest["method"]]
    if config.get("peft_type") != expected:
        raise PeftguardError(
            f"{folder}: adapter type {config.get('peft_type')} does not match method {manifest['method']}"
        )


def attach_adapter(folder: Path, base: PreTrainedModel, manifest: dict[str, Any]) -> PeftModel:
    """``base`` with the adapter in ``folder``, after checking that every adapter tensor fits it."""
    check_adapter_fits(folder, base, manifest)
    try:
        return PeftModel.from_pretrained(base, folder)
    except (RuntimeError, ValueError, KeyError) as exc:  # what the shape check cannot foresee
        raise PeftguardError(f"{folder}: cannot attach the adapter to {manifest['base_model']}: {_first_line(exc)}") from None


def check_adapter_fits(folder: Path, base: PreTrainedModel, manifest: dict[str, Any]) -> None:
    """Compare the adapter file's tensor names and shapes with those the base model would give it.

    An adapter trained on another architecture, hidden size or label count is refused here with
    the first tensor that differs, instead of a size-mismatch error from deep inside torch.
    """
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a pickled adapter (--allow-pickle) is checked by peft itself
    described = f"base model {manifest['base_model']} ({type(base).__name__}, hidden size " \
        f"{getattr(base.config, 'hidden_size', '?')}, {manifest['num_labels']} labels)"
    expected = _expected_adapter_shapes(folder, base, described)
    found = check_safetensors_header(weights)
    unexpected, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
    if unexpected or missing:
        raise PeftguardError(
            f"{folder}: the adapter does not fit {described}: it has tensors {unexpected[:3]} the base model has "
            f"no place for and lacks {missing[:3]}; it was trained for another architecture"
        )
    for name, shape in found.items():
        if shape != expected[name]:
            raise PeftguardError(
                f"{folder}: adapter tensor {name} has shape {list(shape)} but {described} needs {list(expected[name])}; "
                "the adapter was trained for another architecture, hidden size or label count"
            )


def _expected_adapter_shapes(folder: Path, base: PreTrainedModel, described: str) -> dict[str, tuple[int, ...]]:
    """The adapter tensors a fresh adapter of this folder's config would have on ``base`` (built on the meta device)."""
    import warnings

    import torch
    from peft.utils import get_peft_model_state_dict

    try:
        config = PeftConfig.from_pretrained(str(folder))
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the twin is internal: peft's notes about it would mislead
            twin = get_peft_model(type(base)._from_config(copy.deepcopy(base.config)), config)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise PeftguardError(f"{folder}: the adapter does not fit {described}: {_first_line(exc)}") from None
    return {name: tuple(tensor.shape) for name, tensor in get_peft_model_state_dict(twin).items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def method_name(config: MethodConfig) -> str:
    return next(method.value for method, cls in METHOD_CONFIGS.items() if type(config) is cls)
