"""PSIM: the Poisoned Sample Identification Module (Zhao et al., NAACL Findings 2024, Section 4).

A PEFT module (P-tuning v1 by default: 5 virtual tokens, encoder hidden size 128; the
classification head trains too) is trained on the possibly poisoned weights with the training
labels reset uniformly at random. Clean inputs then get low confidence (near 1/K), while inputs
carrying the backdoor trigger keep the poisoned weights' high confidence for the target label.
A sample whose confidence (largest softmax probability) exceeds gamma is flagged as poisoned.

Departures from the paper:

* The paper fixes gamma = 0.7 "through human experience". By default we calibrate gamma on the
  clean dev set to a target false-positive rate (2%); ``gamma=0.7`` reproduces the paper.
* ``reset_rate`` < 1 resets only that share of labels (the paper's Table 13 ablation).
"""
from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftguard import metrics
from peftguard.bounds import BOUNDS
from peftguard.data import Example, TextDataset, label_counts, subsample
from peftguard.defenses.base import InputDefense, Screened
from peftguard.errors import OptionError
from peftguard.instruction import InstructionTemplate
from peftguard.models import LoadOptions, model_reference
from peftguard.training import TrainSettings, predict_proba, train_classifier
from peftguard.tuning import MethodConfig, PTuningV1Config, load_tuned, method_name, save_tuned
from peftguard.victims import check_length_budget, prepare_tunable, training_record

log = logging.getLogger(__name__)

MANIFEST = "psim.json"
DEFAULT_TARGET_FPR = 0.02
PAPER_GAMMA = 0.7
# Chosen by measurement (experiments/psim_lr_sweep.py, MiniLM/SST-2/BadNet, 2000 samples, 1 epoch):
# at the paper's 2e-5 one epoch of random labels barely moves the poisoned head (80% of clean test
# confidences stay above 0.7); at 3e-4 clean confidence centres near 1/2 (mean 0.56, 2.5% above
# 0.7) while every triggered sample stays above 0.7, the paper's Table 12 picture.
DEFAULT_PSIM_LR = 3e-4


def reset_labels(examples: Sequence[Example], num_labels: int, rate: float, seed: int) -> list[Example]:
    """Replace the labels of a ``rate`` share of examples by labels drawn uniformly at random."""
    BOUNDS["reset_rate"].check(rate, "--reset-rate")
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(examples)), round(rate * len(examples))))
    return [Example(ex.text, rng.randrange(num_labels)) if i in chosen else ex for i, ex in enumerate(examples)]


@dataclass
class GammaChoice:
    gamma: float
    how: str  # "fixed" or "target-fpr"
    target_fpr: float | None = None
    calibration_samples: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_gamma_options(gamma: float | None, target_fpr: float | None) -> None:
    if gamma is not None and target_fpr is not None:
        raise OptionError("give --gamma or --target-fpr, not both")
    if gamma is not None:
        BOUNDS["gamma"].check(gamma, "--gamma")
    if target_fpr is not None:
        BOUNDS["target_fpr"].check(target_fpr, "--target-fpr")


def choose_gamma(
    dev_confidences: np.ndarray | None, gamma: float | None, target_fpr: float | None
) -> GammaChoice:
    """A fixed gamma, or one calibrated on clean dev confidences to a target false-positive rate."""
    check_gamma_options(gamma, target_fpr)
    if gamma is not None:
        return GammaChoice(gamma, "fixed")
    target_fpr = DEFAULT_TARGET_FPR if target_fpr is None else target_fpr
    if dev_confidences is None:
        raise OptionError("calibrating gamma needs clean dev samples")
    return GammaChoice(metrics.calibrate_gamma(dev_confidences, target_fpr), "target-fpr", target_fpr, len(dev_confidences))


def train_psim(
    model_ref: str,
    dataset: TextDataset,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    config: MethodConfig | None = None,
    reset_rate: float = 1.0,
    gamma: float | None = None,
    target_fpr: float | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    options: LoadOptions = LoadOptions(),
    template: InstructionTemplate | None = None,
) -> dict[str, Any]:
    """Train a PSIM on ``model_ref`` (the weights to guard) and calibrate its gamma; save it.

    ``template`` is for a clean causal LM read through an instruction; a folder poisoned with one
    carries it already.
    """
    config = config or PTuningV1Config()
    settings.validate()
    check_gamma_options(gamma, target_fpr)
    check_length_budget(config, settings)
    train = reset_labels(
        subsample(dataset.train.examples, max_train_samples, settings.seed), dataset.num_labels, reset_rate, settings.seed
    )
    dev = subsample(dataset.dev.examples, max_eval_samples, settings.seed)
    model, tokenizer = prepare_tunable(model_ref, dataset.num_labels, config, settings, options, template)
    # Dev accuracy means nothing against random labels: keep the last epoch.
    settings = TrainSettings(**{**asdict(settings), "keep_best_on_dev": False})
    report = train_classifier(model, tokenizer, train, None, settings, desc="psim")
    dev_confidence = predict_proba(model, tokenizer, [ex.text for ex in dev], settings.batch_size * 2, settings.max_length).max(1)
    choice = choose_gamma(dev_confidence, gamma, target_fpr)
    check_can_flag(choice)
    warning = detector_warning(dev_confidence, choice.gamma)
    if warning:
        log.warning("PSIM: %s; it would not work as a detector (warning recorded in %s)", warning, MANIFEST)
    manifest = {
        "kind": "psim",
        "method": method_name(config),
        "method_config": asdict(config),
        "base_model": model_reference(model_ref),
        "num_labels": dataset.num_labels,
        "dataset": dataset.name,
        "reset_rate": reset_rate,
        "train_samples": len(train),
        "train_label_counts_after_reset": label_counts(train),
        "gamma": choice.gamma,
        "gamma_choice": choice.as_dict(),
        "dev_confidence_histogram": metrics.confidence_histogram(dev_confidence),
        "dev_confidence_mean": float(dev_confidence.mean()),
        "under_trained": under_trained(float(dev_confidence.mean()), dataset.num_labels),
        "dev_flagged_share": float(metrics.flagged(dev_confidence, choice.gamma).mean()) if len(dev_confidence) else None,
        "detector_warning": warning,
        **training_record(model, settings, report),
    }
    if manifest["under_trained"]:
        log.warning("PSIM: clean dev confidence averages %.3f, far above chance (1/%d): the random-label training has "
                    "not flattened it, so triggered inputs will hardly stand out; train longer (--epochs) or with a "
                    "larger --lr", manifest["dev_confidence_mean"], dataset.num_labels)
    save_tuned(model, tokenizer, out_dir, MANIFEST, manifest)
    return manifest


def check_can_flag(choice: GammaChoice) -> None:
    """Refuse a calibrated gamma no confidence can exceed (clean dev confidences saturated at 1.0)."""
    if not choice.gamma < 1:
        raise OptionError(
            f"PSIM: gamma calibrated to {choice.gamma} on clean dev data: no input can have a confidence above it, "
            "so the detector would flag nothing; train longer (--epochs) or with a larger --lr"
        )


def detector_warning(dev_confidence: np.ndarray, gamma: float) -> str | None:
    """What is wrong with a PSIM that flags every clean dev input, or gives them all one confidence."""
    if len(dev_confidence) == 0:
        return None
    if bool(metrics.flagged(dev_confidence, gamma).all()):
        return f"it flags every one of its {len(dev_confidence)} clean dev inputs (gamma {gamma:.4f} is below all their confidences)"
    if float(np.ptp(dev_confidence)) < 1e-6:
        return (f"it gives all {len(dev_confidence)} clean dev inputs the same confidence {float(dev_confidence[0]):.4f}, "
                "so it cannot tell inputs apart")
    return None


UNDER_TRAINED_SHARE = 0.3


def under_trained(dev_confidence_mean: float, num_labels: int) -> bool:
    """Whether a PSIM's mean clean confidence is still more than 30% of the way from chance (1/K) to certainty.

    Measured: working PSIMs ended at 0.52-0.64 on two classes (bar 0.65) and 0.415 on AG News's four (bar 0.475);
    those that failed to separate (SmolLM2 after 19 steps, AG News after one epoch, the instruction-tuned LM) at
    0.70-0.76 on two and 0.70 on four classes.
    """
    chance = 1 / num_labels
    return dev_confidence_mean > chance + UNDER_TRAINED_SHARE * (1 - chance)


class PSIM:
    """A trained PSIM: confidence of each input, loaded once and reused."""

    def __init__(self, folder: str | Path, *, options: LoadOptions = LoadOptions(), batch_size: int = 64) -> None:
        self.folder = Path(folder)
        self.model, self.tokenizer, self.manifest = load_tuned(self.folder, MANIFEST, options)
        self.batch_size = batch_size
        self.max_length = int(self.manifest["settings"]["max_length"])
        self._memo: dict[int, np.ndarray] = {}

    @property
    def num_labels(self) -> int:
        return int(self.manifest["num_labels"])

    def confidences(self, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray:
        """Largest softmax probability per text (memoized: a grid scores the same test set often)."""
        key = hash(tuple(texts))
        if key not in self._memo:
            probs = predict_proba(self.model, self.tokenizer, list(texts), self.batch_size, self.max_length, desc=desc)
            self._memo = {**dict(list(self._memo.items())[-3:]), key: probs.max(1)}  # the latest 4: bounded memory
        return self._memo[key]

    def gamma_for(self, dev: Sequence[Example] | None, gamma: float | None, target_fpr: float | None) -> GammaChoice:
        """The manifest's gamma unless a fixed gamma or a new target FPR is asked for."""
        if gamma is None and target_fpr is None:
            return GammaChoice(**self.manifest["gamma_choice"])
        scores = self.confidences([ex.text for ex in dev]) if dev and gamma is None else None
        return choose_gamma(scores, gamma, target_fpr)


class PSIMDefense(InputDefense):
    """PSIM as an input defense: flags samples whose confidence exceeds gamma."""

    name = "psim"

    def __init__(self, psim: PSIM, choice: GammaChoice) -> None:
        self.psim, self.choice = psim, choice

    def screen(self, texts: Sequence[str], *, desc: str | None = None) -> Screened:
        scores = self.psim.confidences(texts, desc=desc)
        return Screened(list(texts), metrics.flagged(scores, self.choice.gamma), scores)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "psim": str(self.psim.folder), "gamma": self.choice.gamma, "gamma_choice": self.choice.as_dict()}


REJECTED = "rejected as poisoned"


class GuardedPredictor:
    """A victim behind a PSIM: ``predict`` returns the victim's label, or REJECTED when flagged."""

    def __init__(self, psim: PSIM, victim: Any, tokenizer: Any, *, gamma: float | None = None, max_length: int = 128) -> None:
        self.psim, self.victim, self.tokenizer = psim, victim, tokenizer
        self.gamma = gamma if gamma is not None else float(psim.manifest["gamma"])
        self.max_length = max_length

    def predict(self, texts: Sequence[str]) -> list[int | str]:
        texts = list(texts)
        flags = metrics.flagged(self.psim.confidences(texts), self.gamma)
        passed = [t for t, f in zip(texts, flags) if not f]
        labels = iter(predict_proba(self.victim, self.tokenizer, passed, 64, self.max_length).argmax(1).tolist())
        return [REJECTED if f else next(labels) for f in flags]
