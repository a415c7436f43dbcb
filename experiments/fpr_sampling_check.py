"""How often a gamma calibrated on clean dev texts lets more than a bar's share of clean test texts through, by chance.

    python experiments/fpr_sampling_check.py --out results/fpr_sampling_check results
    python experiments/fpr_sampling_check.py --pool 400/400/9 500/500/18   # several calibrations' counts together

Gamma is the (k+1)-th largest of n clean dev scores, k = floor(target * n) (:func:`peftguard.metrics.calibrate_gamma`).
If dev and test texts are exchangeable (drawn alike), the share of test texts scoring above that order statistic is
Beta(k + 1, n - k) distributed, so the count of m clean test texts flagged is beta-binomial(m, k + 1, n - k): a fact
of order statistics, with no model and no data in it. This reads every committed PSIM cell
calibrated to a target FPR (budget tables' ``results/*/cells/*/defended_metrics.json`` and ``peftguard report
--record``'s ``results/*/cells/*.json``), counts each calibration once (cells that
share a PSIM, gamma and test set, such as one PSIM's rows for several victims, have one FPR), and sets each observed
test FPR beside that distribution: the chance it exceeds the bar, and how extreme the observed count is.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from peftguard.metrics import allowed_flags

BAR = 0.03  # issue 13's clean-test FPR bar


def beta_binomial_pmf(m: int, a: float, b: float) -> list[float]:
    """P(X = x) for x = 0..m, X ~ beta-binomial(m, a, b)."""
    log_beta_ab = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return [math.exp(math.lgamma(m + 1) - math.lgamma(x + 1) - math.lgamma(m - x + 1)
                     + math.lgamma(x + a) + math.lgamma(m - x + b) - math.lgamma(m + a + b) - log_beta_ab)
            for x in range(m + 1)]


def flagged_count_law(dev: int, target: float, test: int) -> list[float]:
    allowed = allowed_flags(dev, target)  # as calibrate_gamma counts it
    return beta_binomial_pmf(test, allowed + 1, dev - allowed)


def defended_metrics(results: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    """``(cell name, metrics)`` of every committed cell, in both layouts: a budget table's
    ``RESULTS/GRID/cells/CELL/defended_metrics.json`` and ``peftguard report --record``'s ``RESULTS/GRID/cells/CELL.json``
    (``{"cell": ..., "metrics": ...}``; that folder's other JSON files are skipped)."""
    for path in sorted(results.glob("*/cells/*/defended_metrics.json")):
        yield f"{path.parts[-4]}/{path.parts[-2]}", json.loads(path.read_text(encoding="utf-8"))
    for path in sorted(results.glob("*/cells/*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(record, dict) and isinstance(record.get("metrics"), dict):
            yield f"{path.parts[-3]}/{path.stem}", record["metrics"]


def calibrations(results: Path) -> list[dict[str, Any]]:
    """One row per distinct calibration of a committed PSIM cell."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for cell, metrics in defended_metrics(results):
        defense = metrics.get("defense")  # older records name the defense only, without its gamma's calibration
        choice = (defense.get("gamma_choice") or {}) if isinstance(defense, dict) else {}
        if choice.get("how") != "target-fpr":
            continue
        dev, test, target = choice["calibration_samples"], metrics["clean_samples"], choice["target_fpr"]
        flagged = round(metrics["false_positive_rate"] * test)
        # Cells share a calibration when they share its gamma (one PSIM's rows for several victims) or its PSIM stage
        # (one stage rebuilt in another grid: same recipe and texts, a gamma differing in the last digits).
        psim_stage = re.search(r"stages/(psim-[0-9a-f]+)/", defense.get("psim") or "")
        keys = {(metrics["dataset"], round(metrics["gamma"], 9), dev, test, flagged)}
        if psim_stage:
            keys.add((metrics["dataset"], psim_stage.group(1), dev, test, flagged))
        known = bool(keys & seen)
        seen |= keys  # a rebuilt stage's gamma joins its stage's calibration too
        if known:
            continue
        rows.append({"dataset": metrics["dataset"], "cell": cell, "dev": dev, "test": test, "target_fpr": target,
                     "flagged": flagged, "fpr": flagged / test})
    for row in rows:
        law = flagged_count_law(row["dev"], row["target_fpr"], row["test"])
        over_bar = allowed_flags(row["test"], BAR)  # counts above this exceed the bar
        row["p_over_bar"] = sum(law[over_bar + 1:])
        row["p_at_least_observed"] = sum(law[row["flagged"]:])
        row["expected_fpr"] = sum(x * p for x, p in enumerate(law)) / row["test"]
    return sorted(rows, key=lambda r: (r["dataset"], r["cell"]))


def pooled(calibrations: Iterable[tuple[int, int, int]], target: float) -> dict[str, Any]:
    """The flagged counts of several independent calibrations, each ``(dev, test, flagged)`` at ``target``, added up:
    the expected total and the chance of a total at least the observed one (their laws convolved)."""
    total_law, observed, tested = np.ones(1), 0, 0
    for dev, test, flagged in calibrations:
        total_law = np.convolve(total_law, flagged_count_law(dev, target, test))
        observed, tested = observed + flagged, tested + test
    return {"flagged": observed, "tested": tested, "expected": round(float(np.arange(len(total_law)) @ total_law), 2),
            "p_at_least_observed": round(float(total_law[observed:].sum()), 4)}


def pool_arg(text: str) -> tuple[int, int, int]:
    try:
        dev, test, flagged = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DEV/TEST/FLAGGED (three whole numbers), got {text!r}") from None
    if not (dev > 0 and test > 0 and 0 <= flagged <= test):
        raise argparse.ArgumentTypeError(f"{text!r}: need DEV, TEST > 0 and 0 <= FLAGGED <= TEST")
    return dev, test, flagged


def summary(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    rows = list(rows)
    over = [r for r in rows if r["fpr"] > BAR]
    expected_over = sum(r["p_over_bar"] for r in rows)
    smallest = min(r["p_at_least_observed"] for r in rows)
    return {
        "calibrations": len(rows), "over_bar": len(over), "expected_over_bar": round(expected_over, 2),
        "mean_fpr": round(sum(r["fpr"] for r in rows) / len(rows), 4),
        "mean_expected_fpr": round(sum(r["expected_fpr"] for r in rows) / len(rows), 4),
        "smallest_p_at_least_observed": smallest,
        # were every calibration drawn alike, about the chance that one of them shows a count at least this unlikely
        "chance_some_cell_that_extreme": 1 - (1 - smallest) ** len(rows),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| dataset | calibrations | mean FPR | expected mean FPR | above 3% | expected above 3% |",
             "|---|---|---|---|---|---|"]
    for dataset in sorted({r["dataset"] for r in rows}) + ["all"]:
        part = [r for r in rows if dataset in ("all", r["dataset"])]
        s = summary(part)
        lines.append(f"| {dataset} | {s['calibrations']} | {100 * s['mean_fpr']:.2f} "
                     f"| {100 * s['mean_expected_fpr']:.2f} | {s['over_bar']} | {s['expected_over_bar']:.2f} |")
    lines += ["", "| cell | dev | test | target | FPR | P(FPR > 3%) | P(count >= observed) |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["fpr"] > BAR:
            lines.append(f"| {r['cell']} | {r['dev']} | {r['test']} | {r['target_fpr']} | {100 * r['fpr']:.2f} "
                         f"| {r['p_over_bar']:.3f} | {r['p_at_least_observed']:.4f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="?", help="the committed results folder")
    parser.add_argument("--out", type=Path, help="writes OUT.json and OUT.md (with RESULTS)")
    parser.add_argument("--pool", type=pool_arg, nargs="+", metavar="DEV/TEST/FLAGGED",
                        help="instead: the summed flagged count of these calibrations against its law")
    parser.add_argument("--target", type=float, default=0.02, help="the calibrations' target FPR (with --pool)")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.pool:
        print(json.dumps(pooled(args.pool, args.target)))
        return
    if args.results is None or args.out is None:
        parser.error("give RESULTS and --out, or --pool")
    rows = calibrations(args.results)
    if not rows:
        raise SystemExit(f"{args.results}: no cell calibrated to a target FPR")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"bar": BAR, "summary": summary(rows), "calibrations": rows}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(table(rows), encoding="utf-8")
    print(table(rows))
    print(json.dumps(record["summary"]))


if __name__ == "__main__":
    main()
