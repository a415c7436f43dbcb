"""Detectors that score inputs with the victim, thresholded at a false-positive rate set on clean dev data.

Every input detector of the benchmark (PSIM, STRIP, DAN, ...) is compared at the same operating point:
the threshold is the one that flags at most ``target_fpr`` of clean dev inputs
(:func:`peftguard.metrics.calibrate_gamma`), never one read off triggered or test inputs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from peftguard import metrics
from peftguard.defenses.base import InputDefense, Screened


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
