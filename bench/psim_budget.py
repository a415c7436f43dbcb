#!/usr/bin/env python
"""Run time of ``psim train``: the clean-data budget rule (default) against the old fixed schedule.

Both train a P-tuning v1 PSIM at lr 3e-4 on the same poisoned MiniLM and the same 2000 SST-2
training samples (labels reset) and calibrate gamma on the same dev set; the old path is one epoch
under a linear schedule (``--epochs 1``), the rule stops by itself. The two are interleaved over
``--repeats`` rounds and the medians and their ratio come from the same run. Needs a poisoned
model folder: the development cell's (``peftguard run configs/psim_budget_dev.yaml ...``) or any
``peftguard poison`` output.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--poisoned", type=Path, required=True, help="poisoned model folder (poisoning.json inside)")
    parser.add_argument("--samples", type=int, default=2000, help="training samples (the demo's size)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "psim_budget.json")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def main() -> None:
    args = parse_args()
    if not (args.poisoned / "poisoning.json").is_file():
        sys.exit(f"{args.poisoned}: not a poisoned model folder; make one with `peftguard poison` first")
    threads = common.setup()
    from peftguard.data import load_dataset
    from peftguard.defenses.psim import train_psim
    from peftguard.defenses.psim_budget import DEFAULT_PSIM_LR, BudgetRule
    from peftguard.training import TrainSettings

    data = load_dataset("sst2")
    steps: dict[str, int] = {}

    def case(budget: BudgetRule | None):
        def run() -> None:
            with tempfile.TemporaryDirectory() as out:
                manifest = train_psim(str(args.poisoned), data, TrainSettings(epochs=1, lr=DEFAULT_PSIM_LR), Path(out) / "psim",
                                      budget=budget, max_train_samples=args.samples)
                steps["rule" if budget else "fixed"] = manifest["training"]["steps"]
        return run

    times = common.interleaved({"fixed one epoch": case(None), "budget rule": case(BudgetRule())}, args.repeats)
    fixed, rule = (common.median(times[k]["wall"]) for k in ("fixed one epoch", "budget rule"))
    fixed_cpu, rule_cpu = (common.median(times[k]["cpu"]) for k in ("fixed one epoch", "budget rule"))
    payload = {"machine": common.machine(), "threads": threads, "samples": args.samples, "repeats": args.repeats,
               "fixed_one_epoch_seconds": fixed, "budget_rule_seconds": rule, "rule_over_fixed": rule / fixed,
               "rule_over_fixed_cpu_seconds": rule_cpu / fixed_cpu,
               "steps": steps, "raw": times}
    common.write_json(args.out, payload)
    print(f"fixed one epoch {fixed:.1f} s ({steps['fixed']} steps), budget rule {rule:.1f} s ({steps['rule']} steps): "
          f"ratio {rule / fixed:.2f} wall, {rule_cpu / fixed_cpu:.2f} CPU")


if __name__ == "__main__":
    main()
