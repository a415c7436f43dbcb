import numpy as np
import pytest

from peftguard import metrics
from peftguard.errors import OptionError


def test_clean_accuracy_and_asr_hand_computed():
    assert metrics.clean_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.attack_success_rate([0, 0, 1, 0], target_label=0) == 0.75


def test_defended_metrics_follow_the_paper_convention():
    # clean: correct & not flagged counts; denominator is all clean samples
    preds, labels = [1, 0, 1, 1], [1, 0, 1, 0]
    flags = [False, True, False, False]
    assert metrics.defended_clean_accuracy(preds, labels, flags) == 0.5  # samples 0 and 2
    # triggered: success only if not flagged and predicted target
    attacked = [0, 0, 1, 0]
    assert metrics.defended_attack_success_rate(attacked, 0, [True, False, False, True]) == 0.25


def test_score_equal_to_gamma_is_not_flagged_for_clean_and_triggered_alike():
    gamma = 0.7
    scores = np.array([0.7, 0.7000001, 0.69])
    assert metrics.flagged(scores, gamma).tolist() == [False, True, False]
    # the same sample (score exactly gamma) is kept in both the clean and the triggered set
    assert metrics.defended_clean_accuracy([1], [1], metrics.flagged([0.7], gamma)) == 1.0
    assert metrics.defended_attack_success_rate([0], 0, metrics.flagged([0.7], gamma)) == 1.0


def test_calibrate_gamma_flags_at_most_the_target_share():
    scores = np.linspace(0.5, 1.0, 100)
    gamma = metrics.calibrate_gamma(scores, 0.05)
    assert (scores > gamma).sum() == 5
    assert (scores > metrics.calibrate_gamma(scores, 0.0)).sum() == 0


def test_calibrate_gamma_with_ties_never_exceeds_the_target():
    scores = np.array([0.9] * 10 + [0.5] * 90)
    gamma = metrics.calibrate_gamma(scores, 0.05)
    assert (scores > gamma).sum() <= 5


def test_calibrate_gamma_rejects_bad_rates():
    with pytest.raises(OptionError):
        metrics.calibrate_gamma([0.5, 0.6], 1.0)
    with pytest.raises(OptionError):
        metrics.calibrate_gamma([], 0.1)


def test_auroc_and_histogram():
    assert metrics.auroc([0.5, 0.55, 0.6], [0.9, 0.95]) == 1.0
    assert metrics.auroc([0.9, 0.95], [0.5, 0.6]) == 0.0
    hist = metrics.confidence_histogram([0.52, 0.55, 0.75, 1.0])
    assert hist["bins"][1] == "0.5-0.6" and hist["counts"] == [0, 2, 0, 1, 0, 1]


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        metrics.clean_accuracy([1, 0], [1])
