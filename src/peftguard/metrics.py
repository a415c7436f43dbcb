"""Clean accuracy, attack success rate, defended metrics, detection quality, calibration and ΔPPL.

Conventions (the PSIM paper, checked against the authors' code):

* CA is accuracy on the clean test set; ASR is the share of triggered non-target samples that
  the model assigns to the target label.
* With a defense that flags samples, a clean sample counts as correct only if it is not flagged
  and the victim is right (denominator: all clean samples); a triggered sample is a successful
  attack only if it is not flagged and the victim predicts the target.
* A sample is flagged when its detector score is strictly greater than gamma.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from peftguard.errors import OptionError

# The paper's Table 12 bins of PSIM confidence (binary tasks start at 0.5).
HISTOGRAM_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def clean_accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    _check_same_length(predictions, labels)
    return float((predictions == labels).mean()) if len(labels) else float("nan")


def attack_success_rate(predictions: Sequence[int], target_label: int) -> float:
    predictions = np.asarray(predictions)
    return float((predictions == target_label).mean()) if len(predictions) else float("nan")


def flagged(scores: Sequence[float], gamma: float) -> np.ndarray:
    """Samples whose score is strictly above gamma (a score equal to gamma is not flagged)."""
    return np.asarray(scores, dtype=np.float64) > gamma


def defended_clean_accuracy(predictions: Sequence[int], labels: Sequence[int], is_flagged: Sequence[bool]) -> float:
    predictions, labels, is_flagged = map(np.asarray, (predictions, labels, is_flagged))
    _check_same_length(predictions, labels, is_flagged)
    return float(((predictions == labels) & ~is_flagged).mean()) if len(labels) else float("nan")


def defended_attack_success_rate(predictions: Sequence[int], target_label: int, is_flagged: Sequence[bool]) -> float:
    predictions, is_flagged = np.asarray(predictions), np.asarray(is_flagged)
    _check_same_length(predictions, is_flagged)
    return float(((predictions == target_label) & ~is_flagged).mean()) if len(predictions) else float("nan")


def auroc(clean_scores: Sequence[float], triggered_scores: Sequence[float]) -> float:
    """Area under the ROC curve of the score as a detector (triggered = positive class)."""
    from sklearn.metrics import roc_auc_score  # here, not at the top: it takes a second to import

    if len(clean_scores) == 0 or len(triggered_scores) == 0:
        return float("nan")
    y = np.concatenate([np.zeros(len(clean_scores)), np.ones(len(triggered_scores))])
    return float(roc_auc_score(y, np.concatenate([clean_scores, triggered_scores])))


# The operating point of every detector, fixed a priori: the share of clean inputs a user accepts to have withheld.
DEFAULT_TARGET_FPR = 0.02


def calibrate_gamma(clean_scores: Sequence[float], target_fpr: float) -> float:
    """The smallest gamma that flags at most ``target_fpr`` of ``clean_scores``.

    With k = floor(target_fpr * n), gamma is the (k+1)-th largest score, so at most k scores are
    strictly above it (ties at gamma stay unflagged).
    """
    if not 0 <= target_fpr < 1:
        raise OptionError(f"--target-fpr must be in [0, 1), got {target_fpr}")
    scores = np.sort(np.asarray(clean_scores, dtype=np.float64))[::-1]
    if len(scores) == 0:
        raise OptionError("cannot calibrate gamma on an empty set")
    return float(scores[min(allowed_flags(len(scores), target_fpr), len(scores) - 1)])


def allowed_flags(n: int, rate: float) -> int:
    """How many of ``n`` inputs a share ``rate`` allows to be flagged: floor(rate * n), robust to float error."""
    return int(np.floor(rate * n + 1e-9))


def perplexity_increase(clean_perplexities: Sequence[float], triggered_perplexities: Sequence[float]) -> float:
    """OpenBackdoor's ΔPPL: the mean over pairs of the triggered text's perplexity minus its clean original's.

    Pairs with no perplexity on either side (NaN: an empty text) are left out; NaN when none is left.
    """
    change = _perplexity_changes(clean_perplexities, triggered_perplexities)
    return float(change.mean()) if len(change) else float("nan")


def perplexity_change_spread(clean_perplexities: Sequence[float], triggered_perplexities: Sequence[float]) -> dict[str, float]:
    """Beside ΔPPL's mean, which a few very short texts with huge perplexities can dominate: the median of the
    per-pair differences and the share of pairs whose perplexity the trigger raised (NaN pairs left out)."""
    change = _perplexity_changes(clean_perplexities, triggered_perplexities)
    if not len(change):
        return {"median_delta_perplexity": float("nan"), "share_raised": float("nan")}
    return {"median_delta_perplexity": float(np.median(change)), "share_raised": float((change > 0).mean())}


def _perplexity_changes(clean_perplexities: Sequence[float], triggered_perplexities: Sequence[float]) -> np.ndarray:
    """Triggered minus clean perplexity per pair, pairs with a NaN on either side left out."""
    clean, triggered = np.asarray(clean_perplexities, dtype=np.float64), np.asarray(triggered_perplexities, dtype=np.float64)
    _check_same_length(clean, triggered)
    usable = np.isfinite(clean) & np.isfinite(triggered)
    return triggered[usable] - clean[usable]


def confidence_histogram(scores: Sequence[float], edges: Sequence[float] = HISTOGRAM_EDGES) -> dict[str, object]:
    """Counts and shares of scores per bin; the last bin includes 1.0."""
    counts, _ = np.histogram(np.asarray(scores, dtype=np.float64), bins=np.asarray(edges))
    total = max(int(counts.sum()), 1)
    labels = [f"{lo:.1f}-{hi:.1f}" for lo, hi in zip(edges[:-1], edges[1:])]
    return {"bins": labels, "counts": counts.tolist(), "shares": (counts / total).round(6).tolist()}


def _check_same_length(*arrays: np.ndarray) -> None:
    if len({len(a) for a in arrays}) > 1:
        raise ValueError(f"length mismatch: {[len(a) for a in arrays]}")
