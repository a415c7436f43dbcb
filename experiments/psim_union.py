#!/usr/bin/env python
"""Two PSIM lenses at once: flag an input when the P-tuning v1 PSIM or the LoRA PSIM flags it.

An analysis of the PSIM v3 candidate's runs (``configs/psim_lora_*.yaml``, which train both PSIMs on the same
suspect weights), not a shipped detector. Each PSIM's gamma is re-calibrated on its own clean dev samples (the ones
``psim train`` calibrated on) at half the target FPR, so the union flags at most the target share of clean dev
inputs (a union bound: nothing is fitted on triggered or test inputs). The union is then applied to the clean and
triggered test confidences the run's evaluations saved (``scores.json``). Per cell it writes each lens alone at
the target FPR (the run's own figures) beside the union: test FPR and detection rate (share of triggered inputs
flagged), in ``cells.csv``, ``table.md`` and one JSON per cell under ``cells/``. Defended ASR needs the victim's per-input predictions, which evaluations do not save, so it is not given.
Usage: python experiments/psim_union.py --out results/psim_union [--victim lora] RUN_DIR...
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = ("run", "dataset", "attack", "seed", "victim", "dev_samples", "ptuning_v1_fpr", "ptuning_v1_detection", "lora_fpr",
           "lora_detection", "union_dev_fpr", "union_fpr", "union_detection")


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def dev_confidences(psim_folder: Path, stage_settings: dict[str, Any]) -> np.ndarray:
    """The PSIM's float32 confidences on the clean dev samples ``psim train`` calibrated its gamma on."""
    from peftguard.data import load_dataset, subsample
    from peftguard.defenses.psim import PSIM

    data = stage_settings["data"]
    dataset = load_dataset(stage_settings["dataset"], data_dir=data["data_dir"])
    dev = subsample(dataset.dev.examples, data["max_eval_samples"], stage_settings["seed"])
    return PSIM(psim_folder, precision="fp32").confidences([ex.text for ex in dev])


def pairs(run_dir: Path, victim: str) -> list[dict[str, Any]]:
    """Per (dataset, attack, seed) with this victim: the calibrated evaluation of each PSIM method (a PSIM's
    confidences do not depend on the victim behind it, so one victim per cell is enough)."""
    plan = read(run_dir / "cells.json")
    found: dict[tuple, dict[str, str]] = {}
    for cell in plan["cells"]:
        if cell["row"] != "defense" or cell.get("evaluate.gamma") is not None or cell["method"] != victim:
            continue
        psim_stage = next(d for d in plan["stages"][cell["stage"]]["deps"] if d.startswith("psim-"))
        method = read(run_dir / "stages" / psim_stage / "artifact" / "psim.json")["method"]
        key = (cell["dataset"], cell["attack"], cell["seed"], cell["method"])
        found.setdefault(key, {})[method] = cell["stage"]
    return [{"key": key, **stages} for key, stages in found.items() if {"ptuning-v1", "lora"} <= stages.keys()]


def union_row(run_dir: Path, pair: dict[str, Any], target_fpr: float, dev_cache: dict[str, np.ndarray]) -> dict[str, Any]:
    from peftguard.metrics import calibrate_gamma

    plan = read(run_dir / "cells.json")
    lens: dict[str, dict[str, Any]] = {}
    for method in ("ptuning-v1", "lora"):
        stage = pair[method]
        psim_stage = next(d for d in plan["stages"][stage]["deps"] if d.startswith("psim-"))
        folder = run_dir / "stages" / psim_stage
        if psim_stage not in dev_cache:
            dev_cache[psim_stage] = dev_confidences(folder / "artifact", read(folder / "stage.json")["settings"])
        scores = read(run_dir / "stages" / stage / "scores.json")
        lens[method] = {"metrics": read(run_dir / "stages" / stage / "metrics.json"), "dev": dev_cache[psim_stage],
                        "clean": np.asarray(scores["clean"]), "triggered": np.asarray(scores["triggered"])}
    flags = {part: np.zeros(len(lens["lora"][part]), dtype=bool) for part in ("dev", "clean", "triggered")}
    for method, view in lens.items():
        gamma = calibrate_gamma(view["dev"], target_fpr / 2)
        for part in flags:
            flags[part] |= view[part] > gamma
    dataset, attack, seed, victim = pair["key"]
    pct = lambda share: f"{100 * share:.2f}"  # noqa: E731
    return {"run": run_dir.name, "dataset": dataset, "attack": attack, "seed": seed, "victim": victim,
            "dev_samples": len(flags["dev"]),
            "ptuning_v1_fpr": pct(lens["ptuning-v1"]["metrics"]["false_positive_rate"]),
            "ptuning_v1_detection": pct(lens["ptuning-v1"]["metrics"]["detection_rate"]),
            "lora_fpr": pct(lens["lora"]["metrics"]["false_positive_rate"]),
            "lora_detection": pct(lens["lora"]["metrics"]["detection_rate"]),
            "union_dev_fpr": pct(flags["dev"].mean()), "union_fpr": pct(flags["clean"].mean()),
            "union_detection": pct(flags["triggered"].mean())}


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="grid runs that trained a P-tuning v1 and a LoRA PSIM")
    parser.add_argument("--out", type=Path, required=True, help="folder for cells.csv and table.md")
    parser.add_argument("--target-fpr", type=float, default=0.02, help="the union's share of clean dev inputs flagged")
    parser.add_argument("--victim", default="lora", help="the victim method whose evaluations are read")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from peftguard.runtime import configure_threads

    configure_threads()  # $PEFTGUARD_THREADS, as the CLI does
    dev_cache: dict[str, np.ndarray] = {}
    rows = [union_row(run, pair, args.target_fpr, dev_cache) for run in args.runs for pair in pairs(run, args.victim)]
    (args.out / "cells").mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = f"{row['run']}-{row['dataset']}-{row['attack']}-seed{row['seed']}.json"
        (args.out / "cells" / name).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    with (args.out / "cells.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    (args.out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
