"""experiments/proposal_probe.py: a part's by-labels AUROC recomputed with the probed models' combined scores."""
from __future__ import annotations

import pytest
from conftest import load_experiment


def test_only_probed_models_change_and_only_by_labels_rows_count():
    script = load_experiment("proposal_probe")
    part = {"models": [
        {"name": "missed", "lens": "by-labels", "trigger": "once in a blue moon", "score": 0.0},
        {"name": "caught", "lens": "by-labels", "trigger": "qi", "score": 1.0},
        {"name": "clean", "lens": "by-labels", "trigger": None, "score": 0.3},
        {"name": "clean-2", "lens": "by-labels", "trigger": None, "score": 0.1},
        {"name": "missed", "lens": "psim", "trigger": "once in a blue moon", "score": 0.9},  # another lens: ignored
    ]}
    result = script.with_proposals(part, {"missed": 0.63, "clean-2": 0.55, "elsewhere": 1.0})
    assert result["models"] == 4 and result["probed"] == 2
    assert result["auroc_by_labels"] == pytest.approx(0.5)  # the miss (0.0) below both clean models
    assert result["auroc_by_labels_with_proposals"] == pytest.approx(1.0)
    assert result["clean_called_backdoored_with_proposals"] == 1  # clean-2 rose above the verdict threshold
