"""Making a model tunable with a registered method, and saving and loading tuned models.

The methods themselves (their configs, defaults and peft configs) are the modules of
:mod:`peftguard.methods`; everything here reads them through its registry ``METHODS``.
"""
from __future__ import annotations

import copy
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft import PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from peftguard.architectures import LORA_TARGETS_FLAG, fit_peft_config
from peftguard.artifacts import atomic_dir, read_json, write_json
from peftguard.bounds import BOUNDS, flag
from peftguard.errors import OptionError, PeftguardError, UnsafeCheckpointError
from peftguard.instruction import InstructionTemplate, LabelWordClassifier, read_template
from peftguard.manifests import read_manifest
from peftguard.methods import METHODS, MethodConfig, method_name
from peftguard.methods.full import FullConfig
from peftguard.methods.lora import LoraMethodConfig
from peftguard.methods.prompt import PromptMethodConfig
from peftguard.methods.ptuning_v1 import PTuningV1Config
from peftguard.methods.ptuning_v2 import PTuningV2Config
from peftguard.models import (
    LoadOptions,
    check_contained,
    check_max_length,
    check_safetensors_header,
    load_classifier,
    load_tokenizer,
)

if TYPE_CHECKING:
    from peftguard.training import TrainSettings

__all__ = [  # the method configs are re-exported: callers import them from here
    "METHODS", "FullConfig", "LoraMethodConfig", "MethodConfig", "PTuningV1Config", "PTuningV2Config",
    "PromptMethodConfig", "method_name",
]

# The command-line flag of a method setting, where it is not simply --<name>.
SETTING_FLAGS = {"r": "--lora-r", "target_modules": LORA_TARGETS_FLAG}


def method_config(method: str, **overrides: Any) -> MethodConfig:
    """The config of ``method`` with the given fields changed; unknown fields and values out of range are errors."""
    cls = METHODS[method].config
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise OptionError(f"method '{method}' has no setting {unknown}; it has {sorted(known)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    for name, value in given.items():
        if name in BOUNDS:
            BOUNDS[name].check(value, SETTING_FLAGS.get(name, flag(name)))
    return cls(**given)


def method_settings(method: str) -> frozenset[str]:
    """The setting names ``method``'s config has (other methods' settings are not its options)."""
    return frozenset(f.name for f in fields(METHODS[method].config))


def make_tunable(model: PreTrainedModel, config: MethodConfig) -> PreTrainedModel | PeftModel:
    """Wrap ``model`` for training with ``config``'s method (full: every weight trains)."""
    label_words = isinstance(model, LabelWordClassifier)
    # A label-word classifier's PEFT module goes on the causal LM inside it; its LM head scores the words.
    peft_config = fit_peft_config(model.lm if label_words else model,
                                  config.peft_config("CAUSAL_LM" if label_words else "SEQ_CLS"), method_name(config))
    if label_words and peft_config is not None:
        model.lm = get_peft_model(model.lm, peft_config)
        return model
    if peft_config is None:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    return get_peft_model(model, peft_config)


def trainable_share(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def prepare_tunable(
    model_ref: str, num_labels: int, config: MethodConfig, settings: TrainSettings, options: LoadOptions,
    template: InstructionTemplate | None = None,
) -> tuple[Any, Any]:
    """Load ``model_ref`` as a classifier and wrap it for ``config``'s method (seeded head init).

    With an instruction ``template`` the classifier is the causal LM scoring label words.
    """
    from peftguard.training import seed_everything  # training (accelerate) loads only when something trains

    seed_everything(settings.seed)
    base = load_classifier(model_ref, num_labels, options, template=template)
    check_max_length(base, settings.max_length, config.virtual_tokens)
    return make_tunable(base, config), load_tokenizer(model_ref, options, template=template)


# --- saving and loading tuned models ---------------------------------------------------------

def save_tuned(
    model: Any, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path, manifest_name: str, manifest: dict[str, Any]
) -> None:
    """Save a fully tuned model folder or a peft adapter folder, with its manifest written last."""
    with atomic_dir(out_dir) as tmp:
        write_tuned(tmp, model, tokenizer, manifest_name, manifest)


def write_tuned(
    folder: Path, model: Any, tokenizer: PreTrainedTokenizerBase, manifest_name: str, manifest: dict[str, Any]
) -> None:
    """Write a model (or adapter), its tokenizer and manifest into ``folder``, the same bytes for the same
    model: for callers that assemble several of them inside one :func:`~peftguard.artifacts.atomic_dir`."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    _forget_last_call(tokenizer)
    tokenizer.save_pretrained(folder)
    _sort_adapter_module_sets(folder / "adapter_config.json")
    write_json(folder / manifest_name, manifest)


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
    if METHODS[manifest["method"]].peft_type is None:
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
    expected = METHODS[manifest["method"]].peft_type
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
