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

import copy
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from peftguard import metrics
from peftguard.data import Example, TextDataset, label_counts, subsample
from peftguard.defenses.base import InputDefense, Screened
from peftguard.errors import OptionError
from peftguard.inference import predict_proba
from peftguard.models import LoadOptions, model_reference
from peftguard.precision import DEFAULT_PRECISION, native, quantize_int8, resolve_precision
from peftguard.tuning import MethodConfig, PTuningV1Config, load_tuned, method_name, save_tuned

if TYPE_CHECKING:  # training modules load only to train: scanning and serving never import them
    from peftguard.instruction import InstructionTemplate
    from peftguard.training import TrainSettings

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
    if not 0 <= rate <= 1:
        raise OptionError(f"--reset-rate must be in [0, 1], got {rate}")
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
    if gamma is not None and not 0 < gamma < 1:
        raise OptionError(f"--gamma must be in (0, 1), got {gamma}")
    if target_fpr is not None and not 0 <= target_fpr < 1:
        raise OptionError(f"--target-fpr must be in [0, 1), got {target_fpr}")


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
    from peftguard.training import TrainSettings, train_classifier
    from peftguard.victims import check_length_budget, prepare_tunable, training_record

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
        **training_record(model, settings, report),
    }
    if manifest["under_trained"]:
        log.warning("PSIM: clean dev confidence averages %.3f, far above chance (1/%d): the random-label training has "
                    "not flattened it, so triggered inputs will hardly stand out; train longer (--epochs) or with a "
                    "larger --lr", manifest["dev_confidence_mean"], dataset.num_labels)
    save_tuned(model, tokenizer, out_dir, MANIFEST, manifest)
    return manifest


UNDER_TRAINED_SHARE = 0.3


def under_trained(dev_confidence_mean: float, num_labels: int) -> bool:
    """Whether a PSIM's mean clean confidence is still more than 30% of the way from chance (1/K) to certainty.

    Measured: working PSIMs ended at 0.52-0.64 on two classes (bar 0.65) and 0.415 on AG News's four (bar 0.475);
    those that failed to separate (SmolLM2 after 19 steps, AG News after one epoch, the instruction-tuned LM) at
    0.70-0.76 on two and 0.70 on four classes.
    """
    chance = 1 / num_labels
    return dev_confidence_mean > chance + UNDER_TRAINED_SHARE * (1 - chance)


INT8_RECHECK_MARGIN = 0.1  # int8 moved a confidence by at most 0.086 on the benchmark set (BENCHMARKS.md)
DEFAULT_BATCH_SIZE = 64  # measured: 32-64 fastest on 2 cores, 16 and 128 slower (bench/detection.py --sweep)


class PSIM:
    """A trained PSIM: confidence of each input, loaded once and reused.

    ``precision`` (see :mod:`peftguard.precision`; default ``auto``): fp32, bf16 autocast, or int8 dynamic
    quantization of the linear layers. With int8, inputs whose confidence lands within
    ``INT8_RECHECK_MARGIN`` of the threshold are scored again at the next precision (bf16 where native,
    else fp32), so flags match that precision's unless int8 moved a confidence by more than the margin.
    P-tuning's virtual tokens cost nothing per call: peft loads the prompt encoder's saved output as a
    fixed embedding in inference mode.
    """

    def __init__(self, folder: str | Path, *, options: LoadOptions = LoadOptions(), batch_size: int = DEFAULT_BATCH_SIZE,
                 precision: str = DEFAULT_PRECISION) -> None:
        import torch

        self.folder = Path(folder)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = resolve_precision(precision, self.device)
        self.model, self.tokenizer, self.manifest = load_tuned(self.folder, MANIFEST, options)
        self.model.to(self.device)
        self.recheck_precision = "bf16" if native("bf16", self.device) else "fp32"
        self.fast_model = quantize_int8(copy.deepcopy(self.model)) if self.precision == "int8" else self.model
        self.batch_size = batch_size
        self.max_length = int(self.manifest["settings"]["max_length"])
        self._memo: dict[int, np.ndarray] = {}

    @property
    def num_labels(self) -> int:
        return int(self.manifest["num_labels"])

    def confidences(self, texts: Sequence[str], *, desc: str | None = None, gamma: float | None = None) -> np.ndarray:
        """Largest softmax probability per text (memoized: a grid scores the same test set often).

        ``gamma`` (default: the manifest's) is the threshold near which int8 confidences are re-scored.
        """
        gamma = float(self.manifest["gamma"]) if gamma is None else gamma
        key = hash((tuple(texts), gamma if self.precision == "int8" else None))
        if key not in self._memo:
            scores = self._probabilities(self.fast_model, list(texts), self.precision, desc).max(1)
            if self.precision == "int8":
                scores = self._recheck(list(texts), scores, gamma)
            self._memo = {**dict(list(self._memo.items())[-3:]), key: scores}  # the latest 4: bounded memory
        return self._memo[key]

    def _probabilities(self, model: Any, texts: list[str], precision: str, desc: str | None = None) -> np.ndarray:
        return predict_proba(model, self.tokenizer, texts, self.batch_size, self.max_length, desc=desc,
                             bf16=precision == "bf16")

    def _recheck(self, texts: list[str], scores: np.ndarray, gamma: float) -> np.ndarray:
        near = np.flatnonzero(np.abs(scores - gamma) < INT8_RECHECK_MARGIN)
        if len(near):
            scores = scores.copy()
            scores[near] = self._probabilities(self.model, [texts[i] for i in near], self.recheck_precision).max(1)
        return scores

    def gamma_for(self, dev: Sequence[Example] | None, gamma: float | None, target_fpr: float | None) -> GammaChoice:
        """The manifest's gamma unless a fixed gamma or a new target FPR is asked for."""
        if gamma is None and target_fpr is None:
            return GammaChoice(**self.manifest["gamma_choice"])
        texts = [ex.text for ex in dev] if dev and gamma is None else None
        scores = self._probabilities(self.model, texts, self.recheck_precision).max(1) if texts else None  # no int8: a calibration
        return choose_gamma(scores, gamma, target_fpr)


class PSIMDefense(InputDefense):
    """PSIM as an input defense: flags samples whose confidence exceeds gamma."""

    name = "psim"

    def __init__(self, psim: PSIM, choice: GammaChoice) -> None:
        self.psim, self.choice = psim, choice

    def screen(self, texts: Sequence[str], *, desc: str | None = None) -> Screened:
        scores = self.psim.confidences(texts, desc=desc, gamma=self.choice.gamma)
        return Screened(list(texts), metrics.flagged(scores, self.choice.gamma), scores)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "psim": str(self.psim.folder), "gamma": self.choice.gamma, "gamma_choice": self.choice.as_dict(),
                "precision": self.psim.precision}


REJECTED = "rejected as poisoned"


@dataclass(frozen=True)
class Verdict:
    """One guarded prediction: the victim's label (or REJECTED) and the confidence behind it.

    ``confidence`` is the PSIM's for a rejected input, else the victim's probability of its label.
    """

    label: int | str
    confidence: float
    psim_confidence: float

    @property
    def rejected(self) -> bool:
        return self.label == REJECTED


class GuardedPredictor:
    """A victim behind a PSIM: ``predict`` returns the victim's label, or REJECTED when flagged.

    The victim runs at ``precision`` (default fp32: its labels are those it gives alone), only on inputs that pass.
    """

    def __init__(self, psim: PSIM, victim: Any, tokenizer: Any, *, gamma: float | None = None, max_length: int = 128,
                 batch_size: int = DEFAULT_BATCH_SIZE, precision: str = "fp32") -> None:
        self.psim, self.victim, self.tokenizer = psim, victim, tokenizer
        self.gamma = gamma if gamma is not None else float(psim.manifest["gamma"])
        self.max_length, self.batch_size = max_length, batch_size
        self.precision = resolve_precision(precision, next(victim.parameters()).device, allowed=("fp32", "bf16"))

    def predict(self, texts: Sequence[str]) -> list[int | str]:
        return [v.label for v in self.verdicts(texts)]

    def verdicts(self, texts: Sequence[str]) -> list[Verdict]:
        texts = list(texts)
        scores = self.psim.confidences(texts, gamma=self.gamma)
        flags = metrics.flagged(scores, self.gamma)
        passed = [t for t, f in zip(texts, flags) if not f]
        probs = iter(predict_proba(self.victim, self.tokenizer, passed, self.batch_size, self.max_length,
                                   bf16=self.precision == "bf16"))
        out = []
        for score, flag in zip(scores, flags):
            if flag:
                out.append(Verdict(REJECTED, float(score), float(score)))
            else:
                p = next(probs)
                out.append(Verdict(int(p.argmax()), float(p.max()), float(score)))
        return out
