#!/usr/bin/env python
"""Subnormal floats: epoch time with and without flushing them to zero, in the same run.

One model and method (default: SmolLM2 prompt tuning at its learning rate 0.1, where the slowdown
was found), ``peftguard.training.train_classifier`` epochs over the same small SST-2 subset,
alternating ``torch.set_flush_denormal(False)`` and ``(True)`` epoch by epoch. Training goes on
across epochs, so a slowdown that appears once the prompt has moved shows up in later epochs.
Medians leave out the first round.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SIZES = {"smollm2": (32, 16, 32), "minilm": (128, 32, 128)}  # samples, batch size, max length


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=list(SIZES))
    parser.add_argument("--method", default="prompt")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def main() -> None:
    args = parse_args()
    threads = common.setup()
    import torch

    from peftguard import training
    from peftguard.models import LoadOptions
    from peftguard.tuning import method_config
    from peftguard.victims import prepare_tunable

    training.flush_denormals = lambda: None  # this script sets the flag itself
    samples, batch_size, max_length = SIZES[args.model]
    config = method_config(args.method)
    settings = training.TrainSettings(epochs=1, lr=config.lr, batch_size=batch_size, max_length=max_length,
                                      keep_best_on_dev=False)
    model, tokenizer = prepare_tunable(args.model, 2, config, settings, LoadOptions())
    examples = common.sst2_examples("train", samples)
    epochs: dict[str, list[tuple[float, float]]] = {"subnormals kept": [], "flushed to zero": []}
    for _ in range(args.rounds):
        for label, flush in (("subnormals kept", False), ("flushed to zero", True)):
            torch.set_flush_denormal(flush)
            epochs[label].append(common.timed_cpu(lambda: training.train_classifier(model, tokenizer, examples, None, settings)))
    rows: list[dict[str, Any]] = [
        {"setting": label, "cpu_s_per_epoch_by_round": [round(c, 2) for _, c in runs],
         "median_wall_s": common.median([w for w, _ in runs[1:]]), "median_cpu_s": common.median([c for _, c in runs[1:]])}
        for label, runs in epochs.items()
    ]
    print(f"{args.model} {args.method} (lr {config.lr}), {samples} samples, {threads} threads; medians of rounds 2..{args.rounds}")
    print(common.table(rows, ["setting", "cpu_s_per_epoch_by_round", "median_wall_s", "median_cpu_s"]))
    out = args.out or common.DEFAULT_OUT_DIR / f"denormals_{args.model}_{args.method}.json"
    common.write_json(out, {"machine": common.machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
