"""Victim fine-tuning: the user adapts (possibly poisoned) weights on clean data."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from peftguard.data import TextDataset, subsample
from peftguard.instruction import InstructionTemplate
from peftguard.models import LoadOptions, model_reference
from peftguard.training import TrainSettings, check_length_budget, train_classifier, training_record
from peftguard.tuning import MethodConfig, method_name, prepare_tunable, save_tuned

__all__ = ["MANIFEST", "finetune", "prepare_tunable"]  # prepare_tunable: bench/ and experiments/ import it from here

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
