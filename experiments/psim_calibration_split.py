"""Does a PSIM's gamma flag more of the clean texts it never saw than of those it was calibrated on?

    python experiments/psim_calibration_split.py --psim runs/instruction-dirty-600/psim --dataset sst2 \\
        --test-samples 300 --out results/psim_calibration_split/instruction_dirty_600.json

A diagnosis of a test FPR above the target; it chooses nothing. Gamma is calibrated on clean dev texts (the subset
``psim train --max-eval-samples`` draws with the PSIM's seed, its size in ``psim.json``); the budget rule watched 256
of those same texts to decide when to stop training. If stopping on them made them look cleaner than other clean
texts (a selection effect), the dev texts outside the subset, which nothing has read, flag as
often as the test texts do, above the target; if dev and test texts differ (a shift), the unread dev texts flag
like the calibration subset and the test texts above it; if neither, all three sit near the target. For each set this
writes its size, mean PSIM confidence, flagged count at the PSIM's gamma, and the chance of at least that count under
the calibration's sampling law (experiments/fpr_sampling_check.py). Clean texts only: no trigger is read.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fpr_sampling_check import flagged_count_law  # noqa: E402

from peftguard.artifacts import write_text  # noqa: E402
from peftguard.data import Example, load_dataset, subsample  # noqa: E402
from peftguard.defenses.psim import PSIM  # noqa: E402
from peftguard.metrics import flagged  # noqa: E402


def describe(name: str, scores: np.ndarray, gamma: float, calibrated_on: int, target: float) -> dict[str, Any]:
    """One set's figures, its flagged count set against the law of a gamma calibrated on ``calibrated_on`` texts."""
    count = int(flagged(scores, gamma).sum())
    law = flagged_count_law(calibrated_on, target, len(scores))
    return {"set": name, "texts": len(scores), "mean_confidence": round(float(scores.mean()), 4), "flagged": count,
            "fpr": round(count / len(scores), 4), "p_at_least_observed": round(float(sum(law[count:])), 4)}


def scores_of(psim: PSIM, examples: list[Example], desc: str) -> dict[int, float]:
    """Each example's PSIM confidence, keyed by the example object (subsets are drawn from the same list)."""
    return dict(zip(map(id, examples), psim.confidences([ex.text for ex in examples], desc=desc)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--psim", required=True, type=Path, help="a PSIM folder (psim train's output)")
    parser.add_argument("--dataset", required=True, help="the dataset it guards (name or folder)")
    parser.add_argument("--test-samples", type=int, help="the test subset the defended evaluation read (reported too)")
    parser.add_argument("--seed", type=int, default=0, help="the evaluation's seed, which drew its test subset")
    parser.add_argument("--precision", default="fp32",
                        help="scoring precision; fp32, at which psim train calibrated gamma on a CPU (PSIM's own "
                             "default, auto, may pick bf16, which moves texts near gamma across it)")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write (must not exist)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another --out")
    psim = PSIM(args.psim, precision=args.precision)
    choice = psim.manifest["gamma_choice"]
    if choice.get("how") != "target-fpr":
        raise SystemExit(f"{args.psim}: its gamma was not calibrated to a target FPR")
    gamma, target = float(choice["gamma"]), float(choice["target_fpr"])
    calibrated_on = int(choice["calibration_samples"])
    budget = psim.manifest.get("budget") or {}
    if budget.get("mode") != "clean-dev rule":
        raise SystemExit(f"{args.psim}: not trained under the budget rule (no monitored dev texts to compare)")
    seed = int(psim.manifest["settings"]["seed"])  # psim train draws its dev subset, and the watched texts, with it
    dataset = load_dataset(args.dataset)
    dev, test = dataset.dev.examples, dataset.test.examples
    calibration = subsample(dev, calibrated_on, seed)
    monitored = {id(ex) for ex in subsample(calibration, int(budget["rule"]["monitor_samples"]), seed)}
    chosen = {id(ex) for ex in calibration}
    unread = [ex for ex in dev if id(ex) not in chosen]
    # The calibration subset is scored as one list, as psim train scored it: gamma is one of those scores, and another
    # batching moves that text's score by float noise across gamma.
    dev_scores = scores_of(psim, calibration, "calibration dev") | scores_of(psim, unread, "other dev")
    test_scores = scores_of(psim, test, "test")
    watched = [ex for ex in calibration if id(ex) in monitored]
    unwatched = [ex for ex in calibration if id(ex) not in monitored]
    sets = {
        "calibration dev (monitored by the budget rule)": [dev_scores[id(ex)] for ex in watched],
        "calibration dev (not monitored)": [dev_scores[id(ex)] for ex in unwatched],
        "dev outside the calibration subset": [dev_scores[id(ex)] for ex in unread],
        "test (all)": list(test_scores.values()),
    }
    if args.test_samples:
        evaluated = subsample(test, args.test_samples, args.seed)
        sets["test (the evaluated subset)"] = [test_scores[id(ex)] for ex in evaluated]
    rows = [describe(name, np.array(scores), gamma, calibrated_on, target) for name, scores in sets.items() if scores]
    for row in rows:
        print(json.dumps(row))
    record = {"psim": str(args.psim), "dataset": dataset.name, "gamma": gamma, "target_fpr": target,
              "calibration_samples": calibrated_on, "psim_seed": seed, "test_seed": args.seed, "sets": rows}
    write_text(args.out, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
