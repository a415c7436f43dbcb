#!/usr/bin/env python
"""Thread settings on a shared machine: training-step time per thread count and OpenMP wait policy.

"before" is OpenMP's default wait policy (what peftguard ran with until ``peftguard.runtime``
set PASSIVE), "after" is PASSIVE. torch's CPU wheel uses GNU OpenMP (libgomp). With as many threads as cores, libgomp spins at
every barrier (``GOMP_SPINCOUNT`` 300k) before sleeping; with more threads than cores it spins
only briefly. On a machine loaded by other processes, a spinning thread burns the core its
descheduled partner needs. ``OMP_WAIT_POLICY`` and thread counts are read when libgomp loads, so
each case runs in a child process; children take turns round-robin over ``--repeats`` rounds.

Each child: MiniLM, one method, ``peftguard.training.train_classifier`` over ``--steps`` batches of
32 SST-2 sentences (max length 64) after a warm-up step; it reports wall and CPU seconds per step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BATCH = 32
WAIT_ENV = "BENCH_WAIT_POLICY"  # the child's OpenMP wait policy: "default" or a policy name


def cases(cores: int) -> dict[str, dict[str, str]]:
    """Label → environment of the child (threads and OpenMP wait policy)."""
    default = {WAIT_ENV: "default"}  # OpenMP's own wait policy (what peftguard did before)
    return {
        "1 thread": {"PEFTGUARD_THREADS": "1", **default},
        f"{cores} threads": {"PEFTGUARD_THREADS": str(cores), **default},
        f"{cores} threads, OMP_WAIT_POLICY=PASSIVE": {"PEFTGUARD_THREADS": str(cores), WAIT_ENV: "PASSIVE"},
        f"{2 * cores} threads": {"PEFTGUARD_THREADS": str(2 * cores), **default},
    }


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["full", "ptuning-v1"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", metavar="METHOD", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "threads.json")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def run_one(method: str, steps: int) -> dict[str, float]:
    from peftguard.models import LoadOptions
    from peftguard.training import TrainSettings, train_classifier
    from peftguard.tuning import method_config
    from peftguard.victims import prepare_tunable

    config = method_config(method)
    settings = TrainSettings(epochs=1, lr=config.lr, batch_size=BATCH, max_length=64, keep_best_on_dev=False)
    model, tokenizer = prepare_tunable("minilm", 2, config, settings, LoadOptions())
    examples = common.sst2_examples("train", 3000)[: steps * BATCH]
    train_classifier(model, tokenizer, examples[:BATCH], None, settings)  # warm-up
    wall, cpu = common.timed_cpu(lambda: train_classifier(model, tokenizer, examples, None, settings))
    import torch

    return {"wall_s_per_step": wall / steps, "cpu_s_per_step": cpu / steps, "threads": torch.get_num_threads()}


def spawn(method: str, env: dict[str, str], steps: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--one", method, "--steps", str(steps)]
    inherited = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # set by our own setup()
    done = subprocess.run(command, capture_output=True, text=True, check=False, env={**inherited, **env})
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.one:
        policy = os.environ.get(WAIT_ENV, "default")
        common.setup(None if policy == "default" else policy)
        print(json.dumps(run_one(args.one, args.steps)))
        return
    cores = common.setup()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(args.repeats):
        for method in args.methods:
            for label, env in cases(cores).items():
                runs.setdefault((method, label), []).append(spawn(method, env, args.steps))
    rows = []
    for (method, label), results in runs.items():
        ok = [r for r in results if "error" not in r]
        rows.append({"method": method, "setting": label, "runs": len(ok),
                     "wall_s_per_step": common.median([r["wall_s_per_step"] for r in ok]),
                     "cpu_s_per_step": common.median([r["cpu_s_per_step"] for r in ok]),
                     "errors": sorted({r["error"] for r in results if "error" in r})})
    for row in rows:
        base = next(r for r in rows if r["method"] == row["method"] and r["setting"] == f"{cores} threads")
        row["wall_vs_default"] = row["wall_s_per_step"] / base["wall_s_per_step"]
    machine = common.machine()
    print(f"{cores} cores, load {machine['load_average_1m_5m_15m'][0]:.1f}; medians of {args.repeats} child runs of {args.steps} steps")
    print(common.table(rows, ["method", "setting", "runs", "wall_s_per_step", "cpu_s_per_step", "wall_vs_default"]))
    common.write_json(args.out, {"machine": machine, "args": vars(args), "rows": rows,
                                 "runs": {f"{m}|{s}": v for (m, s), v in runs.items()}})


if __name__ == "__main__":
    main()
