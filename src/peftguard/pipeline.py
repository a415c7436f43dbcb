"""Glue between artifacts on disk and the stages: what the CLI and the Python API call."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftguard.data import TextDataset, subsample
from peftguard.defenses.base import InputDefense
from peftguard.errors import OptionError, PeftguardError
from peftguard.evaluation import EvalSettings, evaluate
from peftguard.models import LoadOptions, load_classifier, load_tokenizer, model_reference
from peftguard.poisoning import MANIFEST as POISONING_MANIFEST
from peftguard.triggers import Trigger
from peftguard.tuning import load_tuned
from peftguard.victims import MANIFEST as VICTIM_MANIFEST


def load_model(ref: str, num_labels: int, options: LoadOptions = LoadOptions()) -> tuple[Any, Any, dict[str, Any]]:
    """Any model this tool evaluates: a victim folder, a poisoned folder, or a plain classifier."""
    folder = Path(ref)
    if (folder / VICTIM_MANIFEST).is_file():
        model, tokenizer, manifest = load_tuned(folder, VICTIM_MANIFEST, options)
        if int(manifest["num_labels"]) != num_labels:
            raise PeftguardError(f"{ref} was tuned for {manifest['num_labels']} labels; the dataset has {num_labels}")
        return model, tokenizer, manifest
    model = load_classifier(ref, num_labels, options)
    model.eval()
    manifest_path = folder / POISONING_MANIFEST
    manifest = {"kind": "poisoned-model" if manifest_path.is_file() else "model", "method": "full"}
    return model, load_tokenizer(ref, options), manifest


def build_defense(
    defense: str | None,
    dataset: TextDataset,
    *,
    psim_dir: Path | None,
    gamma: float | None,
    target_fpr: float | None,
    max_eval_samples: int | None,
    seed: int,
    options: LoadOptions,
) -> InputDefense | None:
    if defense is None:
        if psim_dir is not None or gamma is not None or target_fpr is not None:
            raise OptionError("--psim/--gamma/--target-fpr need --defense psim")
        return None
    from peftguard.defenses.psim import check_gamma_options

    check_gamma_options(gamma, target_fpr)
    if defense != "psim":
        raise OptionError(f"unknown defense '{defense}'; available: psim")
    if psim_dir is None:
        raise OptionError("--defense psim needs --psim PSIM_DIR (train one with `peftguard psim train`)")
    from peftguard.defenses.psim import PSIM, PSIMDefense

    psim = PSIM(psim_dir, options=options)
    if psim.num_labels != dataset.num_labels:
        raise PeftguardError(f"PSIM {psim_dir} has {psim.num_labels} labels; the dataset has {dataset.num_labels}")
    dev = subsample(dataset.dev.examples, max_eval_samples, seed)
    return PSIMDefense(psim, psim.gamma_for(dev, gamma, target_fpr))


def evaluate_model(
    model_ref: str,
    dataset: TextDataset,
    triggers: Sequence[Trigger],
    *,
    target_label: int = 0,
    defense: str | None = None,
    psim_dir: Path | None = None,
    gamma: float | None = None,
    target_fpr: float | None = None,
    max_eval_samples: int | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    seed: int = 0,
    options: LoadOptions = LoadOptions(),
) -> dict[str, Any]:
    """Load a model and measure CA/ASR (and defended figures), as written to ``metrics.json``."""
    if not 0 <= target_label < dataset.num_labels:
        raise OptionError(f"--target-label {target_label} is outside 0..{dataset.num_labels - 1}")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
    screen = build_defense(
        defense, dataset, psim_dir=psim_dir, gamma=gamma, target_fpr=target_fpr,
        max_eval_samples=max_eval_samples, seed=seed, options=options,
    )
    model, tokenizer, manifest = load_model(model_ref, dataset.num_labels, options)
    test = subsample(dataset.test.examples, max_eval_samples, seed)
    result = evaluate(
        model, tokenizer, test, triggers, target_label=target_label,
        settings=EvalSettings(batch_size, max_length, seed), defense=screen,
    )
    if screen is not None:
        result["gamma"] = screen.describe()["gamma"]
    return {
        "model": model_reference(model_ref),
        "model_kind": manifest.get("kind"),
        "method": manifest.get("method"),
        "dataset": dataset.name,
        **result,
    }
