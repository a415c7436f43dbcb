"""experiments/fpr_sampling_check.py: its law of the flagged count is the one calibrate_gamma produces."""
from __future__ import annotations

import json

import numpy as np

from peftguard.metrics import calibrate_gamma

from conftest import load_experiment


def test_the_law_is_a_distribution_centred_where_the_order_statistic_puts_it():
    law = load_experiment("fpr_sampling_check").flagged_count_law(500, 0.02, 500)
    assert abs(sum(law) - 1) < 1e-9
    mean = sum(x * p for x, p in enumerate(law))
    assert abs(mean - 500 * 11 / 501) < 1e-6  # E[Beta(k+1, n-k)] = (k+1)/(n+1), k = 10


def test_the_law_matches_simulated_calibrations_on_exchangeable_scores():
    rng = np.random.default_rng(0)
    dev, test, draws = 200, 300, 4000
    counts = np.empty(draws, dtype=int)
    for i in range(draws):
        gamma = calibrate_gamma(rng.random(dev), 0.02)
        counts[i] = int((rng.random(test) > gamma).sum())
    law = np.array(load_experiment("fpr_sampling_check").flagged_count_law(dev, 0.02, test))
    over = 9  # more than 3% of 300 flagged
    simulated, predicted = (counts > over).mean(), law[over + 1:].sum()
    assert abs(simulated - predicted) < 4 * np.sqrt(predicted * (1 - predicted) / draws) + 1e-3
    assert abs(counts.mean() - (law * np.arange(test + 1)).sum()) < 0.25  # an off-by-one k moves it by 1.5


def test_cells_sharing_one_calibration_count_once(tmp_path):
    metrics = {"dataset": "sst2", "gamma": 0.61, "clean_samples": 500, "false_positive_rate": 0.024,
               "defense": {"gamma_choice": {"how": "target-fpr", "calibration_samples": 500, "target_fpr": 0.02}}}
    for victim in ("lora", "adapter"):
        cell = tmp_path / "grid" / "cells" / f"sst2-seed0-{victim}"
        cell.mkdir(parents=True)
        (cell / "defended_metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    fixed = tmp_path / "grid" / "cells" / "sst2-fixed-gamma"
    fixed.mkdir()
    (fixed / "defended_metrics.json").write_text(json.dumps({**metrics, "defense": {"gamma_choice": {"how": "fixed"}}}),
                                                 encoding="utf-8")
    rows = load_experiment("fpr_sampling_check").calibrations(tmp_path)
    assert len(rows) == 1 and rows[0]["flagged"] == 12 and 0 < rows[0]["p_over_bar"] < 1


def test_cells_recorded_by_report_record_are_read_and_other_json_skipped(tmp_path):
    metrics = {"dataset": "sst2", "gamma": 0.73, "clean_samples": 500, "false_positive_rate": 0.036,
               "defense": {"gamma_choice": {"how": "target-fpr", "calibration_samples": 500, "target_fpr": 0.02}}}
    cells = tmp_path / "recorded" / "cells"
    cells.mkdir(parents=True)
    (cells / "psim.json").write_text(json.dumps({"cell": {"defense": "psim"}, "metrics": metrics}), encoding="utf-8")
    (cells / "none.json").write_text(json.dumps({"cell": {}, "metrics": {**metrics, "defense": "none"}}),
                                     encoding="utf-8")
    (cells / "list.json").write_text(json.dumps([1, 2]), encoding="utf-8")
    rows = load_experiment("fpr_sampling_check").calibrations(tmp_path)
    assert [(r["cell"], r["flagged"]) for r in rows] == [("recorded/psim", 18)]


def test_one_psim_stage_rebuilt_in_two_grids_counts_once(tmp_path):
    def record(grid: str, gamma: float, stage: str) -> None:
        metrics = {"dataset": "sst2", "gamma": gamma, "clean_samples": 200, "false_positive_rate": 0.04,
                   "defense": {"psim": f"runs/{grid}/stages/{stage}/artifact",
                               "gamma_choice": {"how": "target-fpr", "calibration_samples": 200, "target_fpr": 0.02}}}
        (tmp_path / grid / "cells").mkdir(parents=True, exist_ok=True)
        (tmp_path / grid / "cells" / f"{stage}.json").write_text(json.dumps({"metrics": metrics}), encoding="utf-8")

    record("baselines", 0.66402, "psim-bd40")
    record("headline", 0.66410, "psim-bd40")  # the same stage on another CPU
    record("other", 0.70150, "psim-77aa")  # another PSIM: its own calibration
    rows = load_experiment("fpr_sampling_check").calibrations(tmp_path)
    assert [r["cell"] for r in rows] == ["baselines/psim-bd40", "other/psim-77aa"]


def test_pooling_one_calibration_is_its_own_law_and_pooling_adds_counts():
    check = load_experiment("fpr_sampling_check")
    law = check.flagged_count_law(500, 0.02, 500)
    alone = check.pooled([(500, 500, 18)], 0.02)
    assert alone["p_at_least_observed"] == round(sum(law[18:]), 4) and alone["flagged"] == 18
    two = check.pooled([(500, 500, 18), (400, 400, 9)], 0.02)
    assert two["tested"] == 900 and two["flagged"] == 27
    assert abs(two["expected"] - (alone["expected"] + check.pooled([(400, 400, 9)], 0.02)["expected"])) < 0.02
    assert two["p_at_least_observed"] > alone["p_at_least_observed"]  # 9 of 400 sits at its expectation (8.98): it dilutes the excess
