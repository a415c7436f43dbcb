"""experiments/psim_calibration_split.py: each set's flagged count and its chance under the calibration's law."""
from __future__ import annotations

import numpy as np

from conftest import load_experiment


def test_a_set_counts_scores_strictly_above_gamma_and_reads_the_law_from_its_count():
    split = load_experiment("psim_calibration_split")
    law = split.flagged_count_law(500, 0.02, 4)
    row = split.describe("test", np.array([0.9, 0.7, 0.5, 0.71]), 0.7, 500, 0.02)
    assert (row["texts"], row["flagged"], row["fpr"]) == (4, 2, 0.5)  # 0.7 itself is not flagged
    assert row["p_at_least_observed"] == round(sum(law[2:]), 4) and 0 < row["p_at_least_observed"] < 0.01
    none = split.describe("dev", np.array([0.5, 0.6]), 0.7, 500, 0.02)
    assert none["flagged"] == 0 and none["p_at_least_observed"] == 1.0
