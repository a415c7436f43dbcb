"""When does full fine-tuning wash out a weight-poisoning backdoor that PEFT keeps? (paper Section 3)

Usage: python experiments/contrast_sweep.py --poisoned DIR [--methods full lora] [--lrs ...]
           [--epochs ...] [--train-samples ...] --out FILE.json

Fine-tunes the poisoned model on clean SST-2 for every combination and measures CA and ASR on the
full test set (BadNet trigger, target 0). Rows are printed as they finish and written to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from peftguard.data import load_dataset
from peftguard.pipeline import evaluate_model
from peftguard.training import TrainSettings
from peftguard.triggers import build_trigger
from peftguard.tuning import method_config
from peftguard.victims import finetune


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poisoned", required=True)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--attack", default="badnet")
    parser.add_argument("--methods", nargs="+", default=["full", "lora"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-5, 2e-4, 2e-3])
    parser.add_argument("--epochs", type=int, nargs="+", default=[2])
    parser.add_argument("--train-samples", type=int, nargs="+", default=[2000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    return parser


def main() -> None:
    args = build_parser().parse_args()

    data = load_dataset(args.dataset)
    trigger = build_trigger(args.attack)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["method"], r["lr"], r["epochs"], r["train_samples"]) for r in rows}
    for method, lr, epochs, samples in itertools.product(args.methods, args.lrs, args.epochs, args.train_samples):
        if (method, lr, epochs, samples) in done:
            continue
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            victim = Path(tmp) / "victim"
            manifest = finetune(args.poisoned, data, method_config(method), TrainSettings(epochs=epochs, lr=lr, seed=args.seed),
                                victim, max_train_samples=samples)
            result = evaluate_model(str(victim), data, [trigger], seed=args.seed)
        row = {"method": method, "lr": lr, "epochs": epochs, "train_samples": samples,
               "clean_accuracy": result["clean_accuracy"], "attack_success_rate": result["attack_success_rate"],
               "best_epoch": manifest["training"]["best_epoch"], "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps({"poisoned": args.poisoned, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
