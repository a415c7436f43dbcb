"""Fitting a fine-tuning method to the Hugging Face architecture a user brings.

peft knows some architectures by name and guesses the rest; where it guesses wrong the failure
comes at the first forward pass, deep in a traceback. This module settles, from the model alone
and before any data is read or any step trains, what each method needs of the architecture:

* LoRA's target modules: peft's own per-model-type table first
  (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``), else the attention query/value
  projections found by name in the model (MPNet calls them ``q``/``v``, DistilBERT
  ``q_lin``/``v_lin``), else a one-line error asking for ``--lora-target-modules``;
* the prompt methods' sizes, where the config spells them differently from what peft reads
  (DistilBERT's ``dim``);
* a head that trains whole: some classifiers put new layers before ``classifier`` (DistilBERT's
  ``pre_classifier``, DeBERTa's ``pooler``) that peft would otherwise leave frozen at random;
* refusals, each with its reason (:class:`UnsupportedMethodError`): P-tuning v2 is peft prefix
  tuning, which hands every attention layer past key values, so an architecture whose forward
  takes none cannot have it; for a classifier without them on its own forward, peft calls the
  encoder and classifies its pooler output, which an encoder without a pooler (RoBERTa's
  classifier) does not return.

The README's architecture matrix lists what this gives for common architectures; its test
(``tests/test_architectures.py``) checks each cell against a real training run.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from peft import LoraConfig, PeftConfig, PrefixTuningConfig, TaskType
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from peftguard.errors import OptionError, PeftguardError
from peftguard.instruction import read_template
from peftguard.models import resolve_model

LORA_TARGETS_FLAG = "--lora-target-modules"

# Names of an attention layer's query and value projections, in the order they are tried.
ATTENTION_PROJECTIONS: tuple[tuple[str, str], ...] = (
    ("query", "value"),            # BERT, RoBERTa, ELECTRA
    ("q_proj", "v_proj"),          # LLaMA, Mistral, OPT, BART
    ("query_proj", "value_proj"),  # DeBERTa-v2/v3
    ("q_lin", "v_lin"),            # DistilBERT
    ("q", "v"),                    # MPNet, T5
)

# peft trains these head modules of a sequence classifier by itself (its ``modules_to_save`` default).
PEFT_HEAD_MODULES = ("classifier", "score")

# Why an architecture cannot have a method: the README's matrix quotes these.
NO_PAST_KEY_VALUES = "its forward takes no past key values, which P-tuning v2 (peft prefix tuning) needs"
NO_POOLER = "its encoder has no pooler output, which peft's prefix tuning classifies from"
NO_INPUTS_EMBEDS = "its forward takes no inputs_embeds, which prompt methods feed"
NO_HIDDEN_SIZE = "its config gives no hidden size, which prompt methods size their prompts by"


class UnsupportedMethodError(OptionError):
    """A method the architecture cannot support; ``reason`` is one of the module's reason constants."""

    def __init__(self, architecture: str, method: str, reason: str) -> None:
        self.architecture, self.method, self.reason = architecture, method, reason
        super().__init__(f"{architecture} cannot be tuned with {method}: {reason}; choose another --method")


class _PeftMethod(Protocol):
    def peft_config(self, task_type: TaskType = TaskType.SEQ_CLS) -> PeftConfig | None: ...


def describe(model: PreTrainedModel) -> str:
    """How an error names an architecture: its class and model type."""
    return f"{type(model).__name__} (model type '{getattr(model.config, 'model_type', '?')}')"


def fit_peft_config(model: PreTrainedModel, peft_config: PeftConfig | None, method: str) -> PeftConfig | None:
    """``peft_config`` completed for ``model``'s architecture, or :class:`UnsupportedMethodError`.

    Changes only what peft would leave unset or get wrong; ``None`` (full fine-tuning) passes through.
    """
    if peft_config is None:
        return None
    refuse_unsupported(model, peft_config, method)
    if isinstance(peft_config, LoraConfig):
        _fit_lora(model, peft_config)
    if peft_config.is_prompt_learning:
        _fit_prompt_sizes(model, peft_config)
    if peft_config.task_type == TaskType.SEQ_CLS:
        _train_whole_head(model, peft_config)
    return peft_config


def refuse_unsupported(model: PreTrainedModel, peft_config: PeftConfig, method: str) -> None:
    reason = unsupported_reason(model, peft_config)
    if reason is not None:
        raise UnsupportedMethodError(describe(model), method, reason)


def unsupported_reason(model: PreTrainedModel, peft_config: PeftConfig) -> str | None:
    """Why ``peft_config``'s method cannot work on ``model`` (mirrors peft's own forward paths), or None."""
    if isinstance(peft_config, PrefixTuningConfig):
        if _takes(model, "past_key_values"):
            return None
        backbone = getattr(model, model.base_model_prefix, None)
        if peft_config.task_type != TaskType.SEQ_CLS or backbone is None or not _takes(backbone, "past_key_values"):
            return NO_PAST_KEY_VALUES
        if getattr(backbone, "pooler", None) is None:
            return NO_POOLER
        return None
    if peft_config.is_prompt_learning and not _takes(model, "inputs_embeds"):
        return NO_INPUTS_EMBEDS
    if peft_config.is_prompt_learning and peft_config.token_dim is None and _hidden_size(model) is None:
        return NO_HIDDEN_SIZE
    return None


def _hidden_size(model: PreTrainedModel) -> int | None:
    return getattr(model.config, "hidden_size", None)


def _takes(module: torch.nn.Module, argument: str) -> bool:
    return argument in inspect.signature(type(module).forward).parameters


# --- LoRA ------------------------------------------------------------------------------------

def lora_target_modules(model: PreTrainedModel) -> list[str]:
    """The modules LoRA adapts on ``model``: peft's table for its model type, else the query/value projections by name."""
    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(model.config, "model_type", None))
    names = _linear_layer_names(model)
    if known and set(known) <= names:  # a remote-code model may reuse a model type with other layer names
        return sorted(known)
    for query, value in ATTENTION_PROJECTIONS:
        if query in names and value in names:
            return sorted((query, value))
    raise OptionError(
        f"LoRA does not know which layers of {describe(model)} to adapt; name its attention projections with "
        f"{LORA_TARGETS_FLAG} (its linear layers: {', '.join(sorted(names)[:12]) or 'none'})"
    )


def lora_target_names(given: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``--lora-target-modules a,b`` (or a list, as a manifest holds it) as a tuple of layer names; None: derive them."""
    if given is None:
        return None
    names = given.split(",") if isinstance(given, str) else given
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise OptionError(f"{LORA_TARGETS_FLAG}: expected layer names separated by commas, got {given!r}")
    cleaned = tuple(name.strip() for name in names)
    if not cleaned or not all(cleaned):
        raise OptionError(f"{LORA_TARGETS_FLAG}: expected layer names separated by commas (e.g. query,value), got {given!r}")
    return tuple(sorted(set(cleaned)))  # sorted, as adapter_config.json records them


def _fit_lora(model: PreTrainedModel, config: LoraConfig) -> None:
    if config.target_modules is None and getattr(config, "target_parameters", None) is None:
        config.target_modules = lora_target_modules(model)
        return
    if isinstance(config.target_modules, str):
        return  # a regular expression: peft matches it against full module names
    names = _linear_layer_names(model)
    missing = sorted(set(config.target_modules or ()) - names)
    if missing:
        raise OptionError(
            f"{LORA_TARGETS_FLAG}: {describe(model)} has no linear layer named {', '.join(missing)}; "
            f"its linear layers: {', '.join(sorted(names)[:12]) or 'none'}"
        )


def _linear_layer_names(model: torch.nn.Module) -> set[str]:
    """The last name component of every layer LoRA can adapt (peft matches target modules by this suffix)."""
    return {
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and name
    }


# --- prompt methods and the head -------------------------------------------------------------

def _fit_prompt_sizes(model: PreTrainedModel, config: PeftConfig) -> None:
    """Fill what peft reads from ``config.to_dict()`` under a name this config spells otherwise.

    transformers' ``attribute_map`` answers ``hidden_size`` for DistilBERT's ``dim``, but peft reads
    the dict, where only ``dim`` appears.
    """
    spelled = model.config.to_dict()
    if config.token_dim is None and not {"hidden_size", "n_embd", "d_model"} & spelled.keys():
        config.token_dim = _hidden_size(model)
    if config.num_attention_heads is None and not {"num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"} & spelled.keys():
        config.num_attention_heads = getattr(model.config, "num_attention_heads", None)


def _train_whole_head(model: PreTrainedModel, config: PeftConfig) -> None:
    """Train every layer a sequence classifier adds beside its encoder, not only peft's ``classifier``/``score``."""
    head = [
        name for name, child in model.named_children()
        if name != model.base_model_prefix and any(True for _ in child.parameters())
    ]
    if set(head) - set(PEFT_HEAD_MODULES):
        config.modules_to_save = sorted(set(config.modules_to_save or ()) | set(head))


# --- the check before any data is read -------------------------------------------------------

def check_model_supports(
    model_ref: str, method: str, config: _PeftMethod, trust_remote_code: bool = False, instruction: bool = False
) -> None:
    """Refuse ``method`` for ``model_ref``'s architecture from its config alone (no weights, no data).

    The model is built on the meta device, as the loader would build it (a causal LM when it is
    instruction-tuned); anything that stops that is left to the real loader, which names the
    problem, and :func:`fit_peft_config` checks the real model again in any case.
    """
    built = _skeleton(model_ref, trust_remote_code, instruction)
    if built is not None:
        skeleton, causal = built
        fit_peft_config(skeleton, config.peft_config(TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS), method)


def _skeleton(model_ref: str, trust_remote_code: bool, instruction: bool) -> tuple[PreTrainedModel, bool] | None:
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        location = resolve_model(model_ref)
        causal = instruction or _has_template(location)
        model_config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notes about a model nobody will run
            return auto.from_config(model_config, trust_remote_code=trust_remote_code), causal
    except (PeftguardError, OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError):
        return None  # the loader names the problem with the model itself


def _has_template(location: str) -> bool:
    return Path(location).is_dir() and read_template(Path(location)) is not None
