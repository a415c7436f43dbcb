"""Every detector against every attack at one glance: AUROC, detection rate and FPR per attack x defense x method.

    python experiments/detector_matrix.py results/defense_benchmark/cells.csv > results/defense_benchmark/detectors.md

Reads a report's cells.csv (``peftguard report RUN --record DIR`` writes it) and prints Markdown: one row per
attack and detector, one column group per victim method, each cell "AUROC / detection % at FPR %" (the
threshold calibrated on clean dev data to the run's target FPR), averaged over the seeds present with their
count. A cell the run did not finish is "-". Input detectors only: rows without a detection rate (the model-repair
defenses such as fine-pruning, and the undefended row) are left to the report's CA/ASR table.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def read_cells(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def matrix(cells: list[dict[str, str]]) -> str:
    methods = sorted({c["method"] for c in cells})
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    detectors = list(dict.fromkeys(c["defense"] for c in cells if c["detection_rate"]))
    found: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for cell in cells:
        if cell["detection_rate"]:
            found[(cell["attack"], cell["defense"], cell["method"])].append(cell)
    lines = ["| attack | detector | " + " | ".join(f"{m}: AUROC / detected % at FPR %" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for attack in attacks:
        for detector in detectors:
            row = [_cell(found.get((attack, detector, method), [])) for method in methods]
            if any(entry != "-" for entry in row):
                lines.append(f"| {attack} | {detector} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cell(cells: list[dict[str, str]]) -> str:
    if not cells:
        return "-"
    mean = lambda key: statistics.fmean(float(c[key]) for c in cells)  # noqa: E731
    seeds = f" (n={len(cells)})" if len(cells) > 1 else ""
    return f"{mean('auroc'):.3f} / {100 * mean('detection_rate'):.1f} at {100 * mean('false_positive_rate'):.1f}{seeds}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells_csv", type=Path, help="a report's cells.csv")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.stdout.write(matrix(read_cells(args.cells_csv)) + "\n")


if __name__ == "__main__":
    main()
