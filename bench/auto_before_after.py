#!/usr/bin/env python
"""PSIM's `auto` precision before and after it was measured: int8 re-checked in bf16 (picked by CPU flags) vs fp32.

Until session 16 `auto` picked int8 for PSIM on any x86 CPU with VNNI and re-scored inputs near gamma in bf16
wherever the CPU reported AVX512-BF16. On a virtualized Xeon that reports the flag but multiplies bfloat16 at
about half float32's speed, and for a PSIM whose clean confidences all lie inside int8's re-check band, that
path is slower than plain float32. This times both on the detection benchmark's inputs (half triggered) and
on clean traffic (the same sentences without a trigger), cases taking turns, and checks their flags agree.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--psim", type=Path, help="a trained PSIM folder [the detection benchmark's, built and cached]")
    parser.add_argument("--samples", type=int, default=1000, help="SST-2 test sentences (half get a BadNet trigger)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (medians)")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "auto_before_after.json")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    threads = common.setup()
    import numpy as np

    from detection import psim_cases, test_inputs
    from peftguard.defenses.psim import PSIM

    if args.psim is None:
        from bench_models import ensure_bench_models

        args.psim = ensure_bench_models().psim
    mixed, _ = test_inputs(args.samples)
    clean = [ex.text for ex in common.sst2_examples("test", args.samples)]
    now = PSIM(args.psim)  # today's auto
    before = PSIM(args.psim, precision="int8")
    before.recheck_precision = "bf16"  # what the CPU flags chose before the speed probe
    fp32 = PSIM(args.psim, precision="fp32")
    gamma = float(fp32.manifest["gamma"])

    psims = {"fp32": fp32, "before": before, "now": now}
    cases = {name.removeprefix("psim_"): run for traffic, texts in (("mixed", mixed), ("clean", clean))
             for name, run in psim_cases(psims, texts, gamma, f"_{traffic}").items()}
    for run in cases.values():
        run()  # warm-up
    seconds = common.interleaved(cases, args.repeats)
    median = {name: common.median(v["wall"]) for name, v in seconds.items()}
    flags = {name: run() > gamma for name, run in cases.items()}
    result = {"machine": common.machine(), "threads": threads, "psim": str(args.psim), "samples": args.samples,
              "now_precision": now.precision, "median_s": median,
              **{f"{name}_speedup_vs_fp32_{traffic}": median[f"fp32_{traffic}"] / median[f"{name}_{traffic}"]
                 for name in ("before", "now") for traffic in ("mixed", "clean")},
              "flags_equal_to_fp32": {name: float(np.mean(flags[name] == flags[f"fp32_{name.split('_')[-1]}"]))
                                      for name in cases}}
    print({k: v for k, v in result.items() if k != "machine"})
    common.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
