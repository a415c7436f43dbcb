#!/usr/bin/env python
"""Where restart rule v4 would fire: replayed on every recorded PSIM search, no training.

Every PSIM trained under the clean-data rule records its clean dev confidence at each check (``budget.trajectory``
in ``psim.json``). Rule v4 (``BudgetRule.max_restarts``) changes a run only where a search was still above the
target at a check one epoch (at least ``flat_min_steps`` steps) in; everywhere else the same seed trains the same
steps, so the run time is unchanged. This script feeds each recorded search, check by check, to the rule's own
``decide`` with a restart allowed and writes, per PSIM, whether and at which step it would have restarted
(``cells.csv``; each search it was fed in ``cells/``), and a count per model size / dataset / PSIM method
(``table.md``). PSIMs trained at a fixed schedule
or already under v4 are left out; copies of one PSIM in several result folders count once.
Usage: python experiments/psim_restart_replay.py --out results/psim_restart_replay FOLDER...
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

from peftguard.defenses.psim_budget import BudgetRule, Check, decide

COLUMNS = ("psim", "parameters_m", "dataset", "num_labels", "psim_method", "seed", "steps_per_epoch", "search_steps",
           "stop_reason", "restart_at_step")


def replay(manifest: dict[str, Any]) -> int | None:
    """The step at which v4 (one restart allowed) would abandon this recorded search; None if it would not."""
    budget = manifest["budget"]
    rule = BudgetRule(**{**budget["rule"], "max_restarts": 1})
    spe, k = budget["steps_per_epoch"], manifest["num_labels"]
    warmup = int(manifest["settings"]["warmup_ratio"] * spe)
    checks: list[Check] = []
    for point in budget["trajectory"]:
        if point["step"] > search_steps(budget):
            break
        checks.append(Check(point["step"], point["mean_confidence"]))
        decision = decide(rule, checks, k, steps_per_epoch=spe, warmup_steps=warmup, may_restart=True)
        if decision is not None:
            return point["step"] if decision.reason == "restart" else None
    return None


def search_steps(budget: dict[str, Any]) -> int:
    """Where the search phase ended (rule v1, which did not settle, recorded only where it stopped)."""
    return budget["search_stopped_at_step"] if "search_stopped_at_step" in budget else budget["stopped_at_step"]


def row_of(path: Path) -> dict[str, Any] | None:
    """One PSIM's row, with the search it recorded (``search_trajectory``); None for a PSIM the replay leaves out."""
    manifest = json.loads(path.read_text(encoding="utf-8"))
    budget = manifest.get("budget", {})
    if budget.get("mode") != "clean-dev rule" or budget.get("rule", {}).get("max_restarts"):
        return None
    searched = search_steps(budget)
    return {"psim": str(path), "parameters_m": round(manifest["parameters"]["total"] / 1e6), "dataset": manifest["dataset"],
            "num_labels": manifest["num_labels"], "psim_method": manifest["method"], "seed": manifest["seed"],
            "steps_per_epoch": budget["steps_per_epoch"], "search_steps": searched,
            "stop_reason": budget["stop_reason"], "restart_at_step": replay(manifest),
            "search_trajectory": [p for p in budget["trajectory"] if p["step"] <= searched]}


def fingerprint(row: dict[str, Any]) -> str:
    """One PSIM's identity: the same search recorded under several result folders (or stage paths) counts once."""
    search = [(p["step"], p["mean_confidence"]) for p in row["search_trajectory"]]
    return json.dumps([row["dataset"], row["seed"], row["psim_method"], row["parameters_m"], search])


def markdown(rows: list[dict[str, Any]]) -> str:
    groups = Counter((r["parameters_m"], r["dataset"], r["psim_method"]) for r in rows)
    fired = Counter((r["parameters_m"], r["dataset"], r["psim_method"]) for r in rows if r["restart_at_step"] is not None)
    lines = ["| parameters (M) | dataset | psim_method | psims | would_restart |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {d} | {p} | {n} | {fired[(m, d, p)]} |" for (m, d, p), n in sorted(groups.items())]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders searched for psim.json (e.g. results)")
    parser.add_argument("--out", type=Path, required=True, help="folder for cells.csv, cells/ and table.md")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    seen: set[str] = set()
    rows = []
    for path in sorted(p for folder in args.folders for p in folder.rglob("psim.json")):
        row = row_of(path)
        if row is None or (key := fingerprint(row)) in seen:
            continue
        seen.add(key)
        rows.append(row)
    (args.out / "cells").mkdir(parents=True, exist_ok=True)
    for number, row in enumerate(rows):
        (args.out / "cells" / f"{number:03d}-{row['dataset']}-{row['psim_method']}-seed{row['seed']}.json").write_text(
            json.dumps(row, indent=1) + "\n", encoding="utf-8")
    with (args.out / "cells.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows)
    (args.out / "table.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
