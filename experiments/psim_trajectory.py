#!/usr/bin/env python
"""Diagnosis: how PSIM's separation of triggered from clean inputs evolves while it trains.

Trains a PSIM on a poisoned model for a fixed number of steps at the budget rule's constant rate
and, every ``--every`` steps, records the rule's own signal (mean clean dev confidence) beside what
the rule never sees: the mean confidence on clean and triggered **test** inputs and their AUROC.
Step 0 is the poisoned weights with the PSIM's fresh virtual tokens; the poisoned model alone
(``poisoned_model``) is measured too. This explains failures (is the backdoor there but erased by
the random labels, or never confident to begin with?); it chooses nothing, since it reads test
and triggered data.

Usage: python experiments/psim_trajectory.py --poisoned DIR --attack synattack --out FILE.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from peftguard import metrics
from peftguard.data import load_dataset, subsample
from peftguard.defenses.psim import reset_labels
from peftguard.defenses.psim_budget import DEFAULT_PSIM_LR, BudgetRule, Settling
from peftguard.models import LoadOptions
from peftguard.pipeline import load_model
from peftguard.training import StepMonitor, TrainSettings, predict_proba, train_classifier
from peftguard.triggers import build_triggers, triggered_test_set
from peftguard.tuning import LoraMethodConfig, PTuningV1Config
from peftguard.victims import prepare_tunable

METHODS = {"ptuning-v1": PTuningV1Config, "lora": LoraMethodConfig}


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poisoned", required=True)
    parser.add_argument("--attack", default="badnet")
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--method", default="ptuning-v1", choices=list(METHODS))
    parser.add_argument("--lr", type=float, default=DEFAULT_PSIM_LR)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--decay-from", type=int, default=None,
                        help="constant rate until this step, then linear decay to zero at --steps (0: the fixed "
                             "schedule's shape; the step the rule's search stopped at: the rule's settling)")
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from peftguard.runtime import configure_threads

    configure_threads()  # $PEFTGUARD_THREADS, as the CLI does

    data = load_dataset(args.dataset)
    target = json.loads((Path(args.poisoned) / "poisoning.json").read_text())["poisoning"]["target_label"]
    test = subsample(data.test.examples, args.eval_samples, args.seed)
    trigger = build_triggers([args.attack], dataset=data)[0]
    clean_texts = [ex.text for ex in test]
    triggered_texts = [ex.text for ex in triggered_test_set(test, trigger, target_label=target, seed=args.seed)]
    dev_texts = [ex.text for ex in subsample(data.dev.examples, BudgetRule().monitor_samples, args.seed)]
    settings = TrainSettings(lr=args.lr, seed=args.seed, keep_best_on_dev=False)

    poisoned, tokenizer, _ = load_model(args.poisoned, data.num_labels)
    result = {"args": {k: str(v) for k, v in vars(args).items()},
              "poisoned_model": separation(poisoned, tokenizer, clean_texts, triggered_texts, target), "checks": []}

    model, tokenizer = prepare_tunable(args.poisoned, data.num_labels, METHODS[args.method](), settings, LoadOptions())
    train = reset_labels(subsample(data.train.examples, args.max_train_samples, args.seed), data.num_labels, 1.0, args.seed)

    def check(step: int) -> bool:
        row = {"step": step, "dev_mean_confidence": mean_confidence(model, tokenizer, dev_texts),
               **separation(model, tokenizer, clean_texts, triggered_texts, target)}
        result["checks"].append(row)
        print(json.dumps(row))
        return False

    check(0)
    decay = Settling(args.decay_from, args.steps - args.decay_from).lr_factor if args.decay_from is not None else None
    train_classifier(model, tokenizer, train, None, settings, desc="psim",
                     monitor=StepMonitor(args.every, args.steps, check, decay))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")


def mean_confidence(model, tokenizer, texts: list[str]) -> float:
    return float(predict_proba(model, tokenizer, texts).max(1).mean())


def separation(model, tokenizer, clean: list[str], triggered: list[str], target: int) -> dict[str, float]:
    clean_p, triggered_p = predict_proba(model, tokenizer, clean), predict_proba(model, tokenizer, triggered)
    clean_c, triggered_c = clean_p.max(1), triggered_p.max(1)
    return {"clean_mean_confidence": round(float(clean_c.mean()), 4),
            "triggered_mean_confidence": round(float(triggered_c.mean()), 4),
            "triggered_share_predicted_target": round(float((triggered_p.argmax(1) == target).mean()), 4),
            "triggered_mean_target_probability": round(float(triggered_p[:, target].mean()), 4),
            "auroc": round(metrics.auroc(clean_c, triggered_c), 4),
            "clean_p98": round(float(np.quantile(clean_c, 0.98)), 4),
            "triggered_above_clean_p98": round(float((triggered_c > np.quantile(clean_c, 0.98)).mean()), 4)}


if __name__ == "__main__":
    main()
