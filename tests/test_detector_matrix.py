"""experiments/detector_matrix.py: the per-detector summary of a benchmark's cells.csv."""
from __future__ import annotations

import csv

from conftest import load_experiment

HEADER = ["attack", "defense", "method", "seed", "auroc", "detection_rate", "false_positive_rate"]


def test_matrix_averages_seeds_and_marks_missing_cells(tmp_path):
    rows = [
        ["badnet", "none", "lora", "0", "", "", ""],  # no detector: left out
        ["badnet", "strip", "lora", "0", "0.9", "0.5", "0.02"],
        ["badnet", "strip", "lora", "1", "0.7", "0.3", "0.04"],
        ["badnet", "strip", "ptuning-v1", "0", "1.0", "1.0", "0.0"],
        ["sos", "dan", "lora", "0", "0.5", "0.0", "0.01"],
    ]
    path = tmp_path / "cells.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([HEADER, *rows])
    script = load_experiment("detector_matrix")
    table = script.matrix(script.read_cells(path)).splitlines()
    assert table[0] == "| attack | detector | lora: AUROC / detected % at FPR % | ptuning-v1: AUROC / detected % at FPR % |"
    assert "| badnet | strip | 0.800 / 40.0 at 3.0 (n=2) | 1.000 / 100.0 at 0.0 |" in table
    assert "| sos | dan | 0.500 / 0.0 at 1.0 | - |" in table
    assert not any("| none |" in line for line in table) and len(table) == 4
