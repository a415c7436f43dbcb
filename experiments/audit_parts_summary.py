"""The audit's lenses across held-apart parts: each part, and all of them pooled, with and without the strength gate.

    python experiments/audit_parts_summary.py --out results/audit_zoo/held_apart_parts.md \
        --part 3=results/audit_zoo/held_apart_3.json --part 4=results/audit_zoo/held_apart_4_lenses.json \
        --part 5=results/audit_zoo/held_apart_5.json --part 6=results/audit_zoo/held_apart_6.json \
        --part 7=results/audit_zoo/held_apart_7.json --strength 5=results/audit_zoo/held_apart_5_strength.json \
        --strength 6=results/audit_zoo/held_apart_6_strength.json --strength 7=results/audit_zoo/held_apart_7_strength.json

Reads the per-model rows of each part's summary (experiments/audit_zoo.py's results.json: name, lens, trigger,
verdict, score, top5) and, where a part's backdoor strengths were measured (experiments/zoo_strength.py), leaves out the
poisoned models whose ASR is below --min-asr (audit_zoo.py's gate; parts without a strength file keep every model).
A lens is pooled over the parts where it audited every model. Trigger recovery is counted as audit_zoo.py counts
it (the rows carry no attack name: in the zoo a one-word trigger is a BadNet word and a longer one an InSent
sentence). Pooling is sound because every part's verdict uses the
same score and the same threshold fixed a priori. This reads finished results only; it chooses nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_zoo import backdoor_strengths, recovered, took  # noqa: E402

from peftguard.artifacts import write_text  # noqa: E402

Row = dict[str, Any]  # one model under one lens: name, lens, trigger (None: clean), verdict, score, top5


def numbered(values: list[str], flag: str) -> dict[str, Path]:
    """``N=FILE`` pairs, as given to ``flag``."""
    pairs = {}
    for value in values:
        part, sep, file = value.partition("=")
        if not sep or not part:
            raise SystemExit(f"{flag} {value!r}: give PART=FILE")
        pairs[part] = Path(file)
    return pairs


def gated(rows: list[Row], strength: Path | None, min_asr: float) -> list[Row]:
    """``rows`` without the poisoned models whose measured backdoor is below ``min_asr``."""
    if strength is None:
        return rows
    asr = backdoor_strengths(strength)
    return [r for r in rows if r["trigger"] is None or took(asr, r["name"], min_asr)]


def attack(row: Row) -> str:
    return "badnet" if len(row["trigger"].split()) == 1 else "insent"


def recovery(rows: list[Row], kind: str, k: int) -> list[int]:
    """[recovered, out of] over the poisoned rows of this attack kind: the trigger (a sentence: one of its words)
    among the top ``k`` candidates."""
    mine = [r for r in rows if r["trigger"] is not None and attack(r) == kind]
    return [sum(recovered({"attack": kind, "trigger": r["trigger"]}, r["top5"], k) for r in mine), len(mine)]


def summary(rows: list[Row]) -> dict[str, Any]:
    poisoned = [r["trigger"] is not None for r in rows]
    clean = [r for r in rows if r["trigger"] is None]
    return {"models": len(rows), "poisoned": sum(poisoned),
            "auroc": roc_auc_score(poisoned, [r["score"] for r in rows]) if 0 < sum(poisoned) < len(rows) else None,
            "clean_called_backdoored": sum(r["verdict"] == "backdoored" for r in clean), "clean": len(clean),
            "poisoned_caught": sum(r["verdict"] == "backdoored" for r in rows if r["trigger"] is not None),
            "badnet_top1": recovery(rows, "badnet", 1), "badnet_top5": recovery(rows, "badnet", 5),
            "insent_word_top5": recovery(rows, "insent", 5)}


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = ["| reading | lens | part | models | AUROC | clean called backdoored | poisoned caught | BadNet top-1 | "
             "BadNet top-5 | InSent word top-5 |", "|" + "---|" * 10]
    for reading, by_lens in results.items():
        for lens, by_part in by_lens.items():
            for part, r in by_part.items():
                auroc = "-" if r["auroc"] is None else f"{r['auroc']:.3f}"
                shares = " | ".join(f"{n}/{d}" for n, d in (r["badnet_top1"], r["badnet_top5"], r["insent_word_top5"]))
                lines.append(f"| {reading} | {lens} | {part} | {r['models']} | {auroc} | "
                             f"{r['clean_called_backdoored']}/{r['clean']} | {r['poisoned_caught']}/{r['poisoned']} | "
                             f"{shares} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", required=True, help="PART=FILE: a part's audit_zoo results.json")
    parser.add_argument("--strength", action="append", default=[], help="PART=FILE: its zoo_strength.py JSON")
    parser.add_argument("--min-asr", type=float, default=0.9, help="the ASR a backdoor must reach to count (gated)")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown table (a JSON file beside it)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    parts, strengths = numbered(args.part, "--part"), numbered(args.strength, "--strength")
    rows = {part: json.loads(file.read_text(encoding="utf-8"))["models"] for part, file in parts.items()}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for reading in ("all models", "gated"):
        by_lens: dict[str, dict[str, Any]] = {}
        for lens in dict.fromkeys(r["lens"] for part_rows in rows.values() for r in part_rows):
            complete = {}
            for part, part_rows in rows.items():
                mine = [r for r in part_rows if r["lens"] == lens]
                if mine and len(mine) == len({r["name"] for r in part_rows}):  # the lens audited every model
                    complete[part] = gated(mine, strengths.get(part), args.min_asr) if reading == "gated" else mine
            if complete:
                by_lens[lens] = {part: summary(mine) for part, mine in complete.items()}
                by_lens[lens]["pooled"] = summary([r for mine in complete.values() for r in mine])
        results[reading] = by_lens
    record = {"parts": {p: str(f) for p, f in parts.items()}, "strength": {p: str(f) for p, f in strengths.items()},
              "min_asr": args.min_asr, "results": results}
    write_text(args.out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    write_text(args.out, table(results))
    print(table(results))


if __name__ == "__main__":
    main()
