"""PSIM training settings vs. confidence: where does clean confidence sit near 1/K (paper Table 12)?

Usage: python experiments/psim_lr_sweep.py --poisoned DIR [--lrs 2e-5 1e-4 ...] [--epochs 1 2] --out FILE.json

For each (lr, epochs) a PSIM is trained on the poisoned weights (random labels, P-tuning v1,
5 tokens, hidden 128) and scored on the clean test set and its triggered non-target part
(`--attack badnet|insent|synattack`): histogram in the paper's bins, AUROC, and defended figures at gamma 0.7.

An analysis of fixed schedules (the paper's Figure 3(c)), not a way to choose defaults: it reads test and
triggered samples. PSIM's defaults come from clean dev data only (`peftguard.defenses.psim_budget`).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from peftguard import metrics
from peftguard.data import load_dataset
from peftguard.defenses.psim import PSIM, train_psim
from peftguard.training import TrainSettings
from peftguard.triggers import build_triggers, triggered_test_set


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poisoned", required=True)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--attack", default="badnet")
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-5, 1e-4, 3e-4, 1e-3])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1])
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from peftguard.runtime import configure_threads

    configure_threads()  # $PEFTGUARD_THREADS, as the CLI does

    data = load_dataset(args.dataset)
    test = data.test.examples
    trigger = build_triggers([args.attack], dataset=data)[0]  # synattack reads the dataset's paraphrases
    triggered = triggered_test_set(test, trigger, target_label=0, seed=args.seed)
    rows = []
    for epochs in args.epochs:
        for lr in args.lrs:
            with tempfile.TemporaryDirectory() as tmp:
                manifest = train_psim(args.poisoned, data, TrainSettings(epochs=epochs, lr=lr, seed=args.seed), Path(tmp) / "psim", budget=None,
                                      max_train_samples=args.max_train_samples)
                psim = PSIM(Path(tmp) / "psim")
                clean = psim.confidences([ex.text for ex in test])
                attacked = psim.confidences([ex.text for ex in triggered])
            row = {
                "lr": lr, "epochs": epochs,
                "clean_mean": float(clean.mean()), "triggered_mean": float(attacked.mean()),
                "clean_share_above_0.7": float((clean > 0.7).mean()), "triggered_share_above_0.7": float((attacked > 0.7).mean()),
                "auroc": metrics.auroc(clean, attacked),
                "calibrated_gamma": manifest["gamma"],
                "fpr_at_calibrated": float((clean > manifest["gamma"]).mean()),
                "detection_at_calibrated": float((attacked > manifest["gamma"]).mean()),
                "clean_histogram": metrics.confidence_histogram(clean)["shares"],
                "triggered_histogram": metrics.confidence_histogram(attacked)["shares"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"bins": metrics.confidence_histogram([0.5])["bins"], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
