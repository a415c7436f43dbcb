"""Where a grid run's time went: seconds of each evaluation stage, by defense and by victim method.

Reads a run folder (``peftguard run`` / ``peftguard demo --out``): every stage records its own wall
seconds in ``stages/<name>/stage.json``. With ``--since`` only the evaluation stages that ran from
that time on count (``run.log`` says when each stage ran), so a rerun that added baseline defenses to
a finished demo is timed on its own, and the wall minutes from then to the last stage's end are given
too. Nothing is run; the figures are those the run measured.

    python bench/grid_stage_times.py runs/demo-all --since 2026-12-01T22:01 --out bench/demo_defense_all_s17.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402

RAN = re.compile(r"^(\S+) ran (\S+) in ")


def stages_ran_since(run_dir: Path, since: str | None) -> dict[str, str] | None:
    """The stages ``run.log`` says ran at or after ``since`` (ISO time), with when each finished; None: no filter."""
    if since is None:
        return None
    ran = {}
    for line in (run_dir / "run.log").read_text(encoding="utf-8").splitlines():
        match = RAN.match(line)
        if match and match.group(1) >= since:
            ran[match.group(2)] = match.group(1)
    return ran


def minutes_since(since: str | None, finished: dict[str, str] | None) -> float | None:
    """Wall minutes from ``since`` to the last stage's end (the run's own clock, not a sum of stage times)."""
    from datetime import datetime

    if not since or not finished:
        return None
    return round((datetime.fromisoformat(max(finished.values())) - datetime.fromisoformat(since)).total_seconds() / 60, 1)


def evaluation_times(run_dir: Path, chosen: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per evaluation stage (those in ``chosen`` if given): its defense, the victim's method, its seconds."""
    records = {p.parent.name: json.loads(p.read_text(encoding="utf-8")) for p in (run_dir / "stages").glob("*/stage.json")}
    rows = []
    for name, record in sorted(records.items()):
        if record["kind"] != "evaluate" or (chosen is not None and name not in chosen):
            continue
        settings = record["settings"]
        victim = records.get(settings["victim"], {}).get("settings", {})
        rows.append({"stage": name, "defense": settings["defense"], "method": victim.get("method", "(poisoned model)"),
                     "seconds": record["seconds"]})
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_defense: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        by_defense[row["defense"]][row["method"]] = by_defense[row["defense"]].get(row["method"], 0.0) + row["seconds"]
    return {
        "stages": len(rows),
        "total_minutes": round(sum(r["seconds"] for r in rows) / 60, 1),
        "by_defense": {d: {"minutes": round(sum(m.values()) / 60, 1), "seconds_by_method": m} for d, m in by_defense.items()},
        "minutes_by_method": {method: round(sum(r["seconds"] for r in rows if r["method"] == method) / 60, 1)
                              for method in dict.fromkeys(r["method"] for r in rows)},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--since", help="count only stages that ran at or after this ISO time (run.log)")
    parser.add_argument("--out", type=Path, default=None)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if not (args.run_dir / "stages").is_dir():
        sys.exit(f"{args.run_dir}: not a run folder (no stages/); run `peftguard demo --out {args.run_dir}` first")
    ran = stages_ran_since(args.run_dir, args.since)
    rows = evaluation_times(args.run_dir, ran)
    result = {"run_dir": str(args.run_dir), "since": args.since, "wall_minutes_to_last_stage": minutes_since(args.since, ran),
              **summary(rows), "rows": rows, "machine_at_summary": machine()}
    print(table([{"defense": d, "minutes": v["minutes"],
                  **{m: round(s) for m, s in v["seconds_by_method"].items()}} for d, v in result["by_defense"].items()],
                ["defense", "minutes", *dict.fromkeys(r["method"] for r in rows)]))
    print(f"{result['stages']} evaluation stages, {result['total_minutes']} minutes of stage time; "
          f"{result['wall_minutes_to_last_stage']} minutes from --since to the last stage's end")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
