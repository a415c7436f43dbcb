#!/usr/bin/env python
"""How much the default PSIM's outcome on one suspect model moves between runs: its own seed, nothing else.

Session 23 found that PSIM training is not reproducible across sessions: the same AG News poisoned model (seed 3)
gave a PSIM that stopped at 112 steps and left 21.96% of triggered inputs in session 20, and one that stopped at 88
steps and left 0.00% in session 23, with the same code, settings and library versions. On one machine the training
is bitwise reproducible (two reruns in session 24 gave the same weights as session 23's), and the two trajectories
agree to 5 digits up to step 8 and drift apart after, which points at floating-point rounding that differs between
the CPUs the sessions ran on. A PSIM's seed is the controlled way to see how far such a small difference carries.

For each undefended cell of the given grid runs (the victim method ``--victim``), this trains the default PSIM
(``peftguard psim train`` with no budget or threshold option: the clean-data rule and gamma at the default target
FPR) on the cell's poisoned model, once with the cell's own seed (which is what the grid ran, so its row reproduces
the grid's figures where the machine does) and once with each ``--psim-seeds`` seed (another training subset, label
reset, initialisation and order), and evaluates each in front of the cell's victim exactly as ``peftguard evaluate``
does, on the cell's own test subset and triggered inputs. Nothing is chosen from the result: it measures spread.

It runs the two commands a user runs, so each PSIM folder (under ``--work``) is a plain ``psim train`` output, and
work already done there is reused.

A prediction, written down (session 25, 00:27 UTC) before the remaining PSIMs (cell 7 with seed 100; every cell with
seed 101) finished: of the eight PSIMs measured by then on these cells (including session 20's seed-3 PSIM), the
three that missed (defended ASR > 10%) all trained 112 or 120 steps and the five that caught trained 64 to 88. So the
prediction is: a PSIM that trains **104 steps or more** (its clean signal reached chance after 72 or more steps)
misses, and one that trains 96 or fewer catches. It is checked on the remaining draws only; nothing is chosen from it.
Usage: python experiments/psim_seed_spread.py --psim-seeds 100 101 --out results/psim_seed_spread RUN_DIR...
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("run", "dataset", "attack", "seed", "psim_seed", "ca", "asr", "defended_ca", "defended_asr", "fpr", "auroc",
           "gamma", "psim_steps", "stop_reason", "psim_seconds")


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def attack_cells(run_dir: Path, victim: str) -> list[dict[str, Any]]:
    """Each undefended evaluation of ``victim`` in the run: its settings, metrics and the poisoned model's folder."""
    plan = read(run_dir / "cells.json")
    found = []
    for cell in plan["cells"]:
        if cell["defense"] != "none" or cell["row"] != "attack" or cell["method"] != victim:
            continue
        stage = run_dir / "stages" / cell["stage"]
        settings = read(stage / "stage.json")["settings"]
        poison = next(d for d in plan["stages"][settings["victim"]]["deps"] if d.startswith("poison-"))
        found.append({"run": run_dir.name, "settings": settings, "metrics": read(stage / "metrics.json"),
                      "victim": run_dir / "stages" / settings["victim"] / "artifact",
                      "poisoned": run_dir / "stages" / poison / "artifact"})
    return found


def peftguard(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "peftguard", *args], check=True)


def measure(cell: dict[str, Any], psim_seed: int, work: Path) -> dict[str, Any]:
    """Train (unless done) and evaluate (unless done) one PSIM for the cell; its table row."""
    s = cell["settings"]
    folder = work / f"{cell['run']}-{s['dataset']}-{'+'.join(s['attacks'])}-seed{s['seed']}" / f"psim-seed{psim_seed}"
    data = [f"--dataset={s['dataset']}", f"--max-eval-samples={s['data']['max_eval_samples']}"]
    if s["data"]["data_dir"]:
        data.append(f"--data-dir={s['data']['data_dir']}")
    if not (folder / "psim.json").exists():
        peftguard("psim", "train", f"--model={cell['poisoned']}", f"--out={folder}", f"--seed={psim_seed}",
                  f"--max-train-samples={s['data']['max_train_samples']}", *data)
    metrics_file = folder.with_name(folder.name + "-metrics.json")  # evaluate refuses an --out inside --psim
    if not metrics_file.exists():
        attacks = [f"--attack={a}" for a in s["attacks"]]
        peftguard("evaluate", f"--model={cell['victim']}", f"--out={metrics_file}", "--defense=psim",
                  f"--psim={folder}", f"--seed={s['seed']}", f"--target-label={s['target_label']}",
                  f"--batch-size={s['evaluate']['batch_size']}", f"--max-length={s['evaluate']['max_length']}",
                  *attacks, *data)
    psim, defended, undefended = read(folder / "psim.json"), read(metrics_file), cell["metrics"]
    return {
        "run": cell["run"], "dataset": s["dataset"], "attack": "+".join(s["attacks"]), "seed": s["seed"],
        "psim_seed": psim_seed, "ca": _pct(undefended["clean_accuracy"]),
        "asr": _pct(undefended["attack_success_rate"]),
        "defended_ca": _pct(defended["defended_clean_accuracy"]),
        "defended_asr": _pct(defended["defended_attack_success_rate"]),
        "fpr": _pct(defended["false_positive_rate"]), "auroc": round(defended["auroc"], 3),
        "gamma": round(psim["gamma"], 4), "psim_steps": psim["training"]["steps"],
        "stop_reason": psim["budget"]["stop_reason"], "psim_seconds": psim["training"]["seconds"],
        "trajectory": psim["budget"]["trajectory"],
    }


def _pct(share: float) -> float:
    return round(100 * share, 2)


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="grid runs whose undefended cells to guard")
    parser.add_argument("--out", type=Path, required=True, help="folder for cells.csv, table.md and cells/")
    parser.add_argument("--psim-seeds", type=int, nargs="+", required=True,
                        help="PSIM seeds besides each cell's own (fixed before running, not chosen from results)")
    parser.add_argument("--work", type=Path, default=Path("runs/psim_seed_spread"),
                        help="folder for the PSIMs and their evaluations (weights: not for results/)")
    parser.add_argument("--victim", default="lora", help="the victim method whose cells are guarded")
    parser.add_argument("--min-asr", type=float, default=90.0,
                        help="skip cells whose undefended ASR is below this (%%): the issue's bars are for strong ones")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    cells = [cell for run in args.runs for cell in attack_cells(run, args.victim)
             if 100 * cell["metrics"]["attack_success_rate"] >= args.min_asr]
    rows = [measure(cell, seed, args.work) for cell in cells
            for seed in dict.fromkeys((cell["settings"]["seed"], *args.psim_seeds))]
    write(args.out, rows)


def write(out: Path, rows: list[dict[str, Any]]) -> None:
    """``cells.csv`` and ``table.md`` (one row per PSIM), and each PSIM's row with its trajectory under ``cells/``."""
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = "{run}-{dataset}-{attack}-seed{seed}-psim{psim_seed}.json".format(**row)
        (out / "cells" / name).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    with (out / "cells.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    from peftguard.report import markdown

    table = markdown(list(COLUMNS), [[row[c] for c in COLUMNS] for row in rows])
    (out / "table.md").write_text(table, encoding="utf-8")
    print(table, end="")


if __name__ == "__main__":
    main()
