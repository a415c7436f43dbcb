#!/usr/bin/env python
"""The PSIM budget-rule matrix: one row per (cell, PSIM) with what the rule chose and what it did.

Reads grid runs (``peftguard run configs/psim_budget_*.yaml --out runs/NAME``) and writes, for
each defended cell, the undefended CA/ASR beside the defended CA/ASR, FPR, AUROC and detection
rate at the calibrated gamma, and the rule's decision (steps, epochs, stop reason, clean dev
confidence, under_trained) with the PSIM's training seconds; as ``cells.csv`` and ``table.md``, and
copies each cell's small result files (``psim.json``, both ``metrics.json``) under ``cells/``.
Usage: python experiments/psim_budget_table.py --out results/psim_budget [--victim lora] [--calibrated-only]
       [--with-restarts] RUN_DIR...
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from typing import Any

COLUMNS = ("run", "role", "model", "dataset", "attack", "scenario", "seed", "victim", "psim_method", "row", "threshold", "target_fpr", "ca", "asr", "defended_ca",
           "defended_asr", "fpr", "detection_rate", "auroc", "gamma", "psim_steps", "settle_steps", "psim_epochs", "stop_reason",
           "dev_confidence_mean", "under_trained", "psim_seconds", "max_restarts", "psim_seed", "restarts", "abandoned_seconds")
RESTART_COLUMNS = ("max_restarts", "psim_seed", "restarts", "abandoned_seconds")
KEY = ("model", "dataset", "attack", "scenario", "seed", "method")


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    plan = read(run_dir / "cells.json")
    role = "development" if plan["name"].startswith(("psim_budget_dev", "psim_score_dev")) else "validation"
    default_fpr = read(run_dir / "config.json").get("evaluate", {}).get("target_fpr", 0.02)
    stages = run_dir / "stages"
    metrics = {c["stage"]: read(stages / c["stage"] / "metrics.json") for c in plan["cells"]
               if (stages / c["stage"] / "metrics.json").is_file()}
    undefended = {tuple(c[k] for k in KEY): metrics.get(c["stage"]) for c in plan["cells"] if c["row"] == "attack"}
    rows = []
    for cell in plan["cells"]:
        if cell["row"] not in ("defense", "defense_clean") or cell["stage"] not in metrics:
            continue
        m = metrics[cell["stage"]]
        psim_stage = next(d for d in plan["stages"][cell["stage"]]["deps"] if d.startswith("psim-"))
        manifest = read(stages / psim_stage / "artifact" / "psim.json")
        before = undefended.get(tuple(cell[k] for k in KEY)) if cell["row"] == "defense" else None
        training = manifest["training"]
        before_stage = next((c["stage"] for c in plan["cells"] if c["row"] == "attack"
                             and all(c[k] == cell[k] for k in KEY)), None)
        sources = {"psim.json": stages / psim_stage / "artifact" / "psim.json",
                   "defended_metrics.json": stages / cell["stage"] / "metrics.json"}
        if before_stage and cell["row"] == "defense":
            sources["attack_metrics.json"] = stages / before_stage / "metrics.json"
        rows.append({"_files": sources,
            "run": plan["name"], "role": role, "model": cell["model"], "dataset": cell["dataset"], "attack": cell["attack"],
            "scenario": cell["scenario"], "seed": cell["seed"], "victim": cell["method"], "psim_method": manifest["method"],
            "row": cell["row"], "threshold": threshold_rule(cell),
            "target_fpr": cell.get("evaluate.target_fpr", default_fpr),
            "ca": pct(before["clean_accuracy"]) if before else pct(m["clean_accuracy"]),
            "asr": pct(before.get("attack_success_rate")) if before else "",
            "defended_ca": pct(m["defended_clean_accuracy"]), "defended_asr": pct(m.get("defended_attack_success_rate")),
            "fpr": pct(m["false_positive_rate"]), "detection_rate": pct(m.get("detection_rate")),
            "auroc": f"{m['auroc']:.3f}" if m.get("auroc") is not None else "", "gamma": f"{m['gamma']:.3f}",
            "psim_steps": training["steps"], "settle_steps": manifest["budget"].get("settle_steps", 0), "psim_epochs": round(training["steps"] / manifest["budget"].get("steps_per_epoch", training["steps"]), 2),
            "stop_reason": manifest["budget"]["stop_reason"], "dev_confidence_mean": f"{manifest['dev_confidence_mean']:.3f}",
            "under_trained": manifest["under_trained"], "psim_seconds": training["seconds"],
            "max_restarts": manifest["budget"].get("rule", {}).get("max_restarts", 0),
            "psim_seed": manifest["budget"].get("seed", manifest["seed"]),
            "restarts": len(manifest["budget"].get("abandoned_tries", [])),
            "abandoned_seconds": manifest["budget"].get("abandoned_seconds", 0),
        })
    return rows


def threshold_rule(cell: dict[str, Any]) -> str:
    """``calibrated`` (gamma from clean dev data at the target FPR) or the fixed gamma a sweep set."""
    gamma = cell.get("evaluate.gamma")
    return "calibrated" if gamma is None else f"gamma {gamma}"


def cell_name(row: dict[str, Any]) -> str:
    fpr = f"-fpr{row['target_fpr']}" if row["target_fpr"] != 0.02 else ""
    model = "" if row["model"] == "minilm" else f"{row['model']}-"
    victim = "" if row["victim"] == "lora" else f"-{row['victim']}"
    fixed = "" if row["threshold"] == "calibrated" else f"-{row['threshold'].replace(' ', '')}"
    restarts = f"-restarts{row['max_restarts']}" if row["max_restarts"] else ""
    return (f"{model}{row['dataset']}-{row['attack']}-{row['scenario']}-seed{row['seed']}{victim}-{row['row']}"
            f"-psim-{row['psim_method']}{restarts}{fpr}{fixed}")


def pct(value: float | None) -> str:
    return "" if value is None or value != value else f"{100 * value:.2f}"


def markdown(rows: list[dict[str, Any]], with_restarts: bool = False) -> str:
    shown = ("role", "model", "dataset", "attack", "scenario", "seed", "victim", "psim_method", "row", "threshold", "target_fpr", "ca", "asr", "defended_ca",
             "defended_asr", "fpr", "auroc", "psim_steps", "settle_steps", "psim_epochs", "stop_reason", "dev_confidence_mean",
             "psim_seconds") + (RESTART_COLUMNS if with_restarts else ())
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(str(r[c]) for c in shown) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for cells.csv and table.md")
    parser.add_argument("--victim", help="keep only the rows of this victim method (e.g. lora); default: every victim")
    parser.add_argument("--calibrated-only", action="store_true", help="leave out the rows at a fixed gamma")
    parser.add_argument("--with-restarts", action="store_true",
                        help="also show the kept PSIM's seed, its abandoned tries and their seconds (restart rule)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    rows = [row for run in args.runs for row in rows_of(run)
            if (args.victim is None or row["victim"] == args.victim) and (not args.calibrated_only or row["threshold"] == "calibrated")]
    args.out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        folder = args.out / "cells" / cell_name(row)
        folder.mkdir(parents=True, exist_ok=True)
        for name, source in row.pop("_files").items():
            shutil.copyfile(source, folder / name)
    with (args.out / "cells.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, args.with_restarts)
    (args.out / "table.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
