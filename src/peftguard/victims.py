"""Victim fine-tuning: the user adapts (possibly poisoned) weights on clean data."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from peftguard.data import TextDataset, subsample
from peftguard.errors import OptionError
from peftguard.instruction import InstructionTemplate
from peftguard.models import LoadOptions, check_max_length, load_classifier, load_tokenizer, model_reference
from peftguard.provenance import device_description, versions
from peftguard.training import TrainReport, TrainSettings, seed_everything, train_classifier
from peftguard.tuning import MethodConfig, make_tunable, method_name, save_tuned, trainable_share

MANIFEST = "finetune.json"


def finetune(
    model_ref: str,
    dataset: TextDataset,
    config: MethodConfig,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    options: LoadOptions = LoadOptions(),
    template: InstructionTemplate | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_ref`` on the clean training set with ``config``'s method; save it.

    ``template`` instruction-tunes a causal LM (answers as label words) instead of adding a head.
    """
    settings.validate()
    check_length_budget(config, settings)
    train = subsample(dataset.train.examples, max_train_samples, settings.seed)
    dev = subsample(dataset.dev.examples, max_eval_samples, settings.seed)
    model, tokenizer = prepare_tunable(model_ref, dataset.num_labels, config, settings, options, template)
    report = train_classifier(model, tokenizer, train, dev, settings, desc=f"finetune {method_name(config)}")
    manifest = {
        "kind": "victim",
        "method": method_name(config),
        "method_config": asdict(config),
        "base_model": model_reference(model_ref),
        "num_labels": dataset.num_labels,
        "dataset": dataset.name,
        "train_samples": len(train),
        **training_record(model, settings, report),
    }
    save_tuned(model, tokenizer, out_dir, MANIFEST, manifest)
    return manifest


def prepare_tunable(
    model_ref: str, num_labels: int, config: MethodConfig, settings: TrainSettings, options: LoadOptions,
    template: InstructionTemplate | None = None,
) -> tuple[Any, Any]:
    """Load ``model_ref`` as a classifier and wrap it for ``config``'s method (seeded head init).

    With an instruction ``template`` the classifier is the causal LM scoring label words.
    """
    seed_everything(settings.seed)
    base = load_classifier(model_ref, num_labels, options, template=template)
    check_max_length(base, settings.max_length, config.virtual_tokens)
    return make_tunable(base, config), load_tokenizer(model_ref, options, template=template)


def training_record(model: Any, settings: TrainSettings, report: TrainReport) -> dict[str, Any]:
    """The manifest fields every trained artifact shares: settings, training curve, provenance."""
    trainable, total = trainable_share(model)
    return {
        "seed": settings.seed,
        "settings": asdict(settings),
        "training": report.as_dict(),
        "parameters": {"trainable": trainable, "total": total},
        "device": device_description(),
        "versions": versions(),
    }


def check_length_budget(config: MethodConfig, settings: TrainSettings) -> None:
    if settings.max_length <= config.virtual_tokens + 2:
        raise OptionError(
            f"--max-length {settings.max_length} leaves no room for text after "
            f"{config.virtual_tokens} virtual tokens"
        )
