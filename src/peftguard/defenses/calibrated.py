"""Detectors that score inputs with the victim, thresholded at a false-positive rate set on clean dev data.

Every input detector of the benchmark (PSIM, STRIP, DAN, ...) is compared at the same operating point:
the threshold is the one that flags at most ``target_fpr`` of clean dev inputs
(:func:`peftguard.metrics.calibrate_gamma`), never one read off triggered or test inputs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from peftguard import metrics
from peftguard.data import subsample
from peftguard.defenses.base import DefenseContext, InputDefense, Screened, Victim
from peftguard.errors import PeftguardError

from peftguard.metrics import DEFAULT_TARGET_FPR

TARGET_FPR_HELP = f"calibrate the threshold on clean dev data to flag at most this share [{DEFAULT_TARGET_FPR}]"


class Scorer(Protocol):
    """Suspicion scores of inputs: higher means more likely to carry a trigger."""

    def scores(self, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray: ...

    def settings(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Threshold:
    value: float
    target_fpr: float
    calibration_samples: int

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.value, "target_fpr": self.target_fpr, "calibration_samples": self.calibration_samples}


def calibrate(scorer: Scorer, clean_dev_texts: Sequence[str], target_fpr: float) -> Threshold:
    """The threshold that flags at most ``target_fpr`` of the clean dev inputs."""
    scores = scorer.scores(clean_dev_texts, desc="calibrating on clean dev")
    return Threshold(metrics.calibrate_gamma(scores, target_fpr), target_fpr, len(clean_dev_texts))


class CalibratedDetector(InputDefense):
    """An input defense that withholds inputs whose score is above a calibrated threshold."""

    def __init__(self, name: str, scorer: Scorer, threshold: Threshold) -> None:
        self.name, self.scorer, self.threshold = name, scorer, threshold

    def screen(self, texts: Sequence[str], *, desc: str | None = None) -> Screened:
        scores = self.scorer.scores(texts, desc=desc)
        return Screened(list(texts), metrics.flagged(scores, self.threshold.value), scores)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.threshold.as_dict(), **self.scorer.settings()}


class VictimDetector(InputDefense):
    """A detector that reads the victim: :meth:`bind` builds its scorer on the victim and calibrates
    the threshold on clean dev inputs (those the scorer held out from its own fitting, if any)."""

    needs_victim = True

    def __init__(self, name: str, make_scorer: Callable[[Victim], Scorer], dev_texts: Sequence[str],
                 target_fpr: float | None, settings: dict[str, Any]) -> None:
        self.name, self.make_scorer, self.dev_texts = name, make_scorer, list(dev_texts)
        self.target_fpr = DEFAULT_TARGET_FPR if target_fpr is None else target_fpr
        self.settings = settings

    def bind(self, victim: Victim) -> CalibratedDetector:
        scorer = self.make_scorer(victim)
        calibration = getattr(scorer, "held_out_texts", None) or self.dev_texts
        return CalibratedDetector(self.name, scorer, calibrate(scorer, calibration, self.target_fpr))

    def screen(self, texts: Sequence[str], *, desc: str | None = None) -> Screened:
        raise PeftguardError(f"{self.name} reads the victim's predictions: bind it to a victim first")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "target_fpr": self.target_fpr, **self.settings}


def clean_dev_texts(context: DefenseContext) -> list[str]:
    """The clean dev inputs a detector fits and calibrates on: the evaluation's dev subset."""
    return [ex.text for ex in subsample(context.dataset.dev.examples, context.max_eval_samples, context.seed)]
