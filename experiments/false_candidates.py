"""False candidates on the clean models of held-apart parts, per lens and per kind of dataset (binary or AG News).

    python experiments/false_candidates.py --part 5 --part 6 --part 7 --part 8 --out results/audit_zoo/false_candidates_5_8.md

Reads each clean model's saved audit (results/audit_zoo/held_apart_N/<lens>/hN-clean-*.audit.json) and counts, among
its top 5 candidates, (a) those holding a task word of the dataset (audit_zoo.py's count: a word in at least 5 clean
training texts, 75% of them with one label), and (b) those that would accuse it: a flag rate above the audit's
threshold and not explained by the task. (b) is what a false alarm is made of; (a) misses rare sentiment words.
The sixth part's PSIM lens is read off its run with proposals, as audit_zoo.py reads it. Reads finished audits
only; it chooses nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_zoo import task_word_count, without_proposals  # noqa: E402

from peftguard.artifacts import write_text  # noqa: E402

LENSES = ("psim", "classifier")


def accusing(audit: dict[str, Any]) -> int:
    """Top-5 candidates that would make the verdict: above the threshold and not explained by the task."""
    return sum(c["flag_rate"] > audit["threshold"] and not c.get("explained_by_task") for c in audit["candidates"][:5])


def count_part(folder: Path, part: str) -> dict[str, dict[str, dict[str, int]]]:
    """{lens: {binary|agnews: {models, places, task_words, accusing}}} over the part's clean models."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for lens in LENSES:
        saved = "psim-proposals" if lens == "psim" and not (folder / "psim").is_dir() else lens
        for file in sorted((folder / saved).glob(f"h{part}-clean-*.audit.json")):
            audit = json.loads(file.read_text(encoding="utf-8"))
            audit = without_proposals(audit) if saved == "psim-proposals" else audit
            dataset = audit["settings"]["dataset"]
            top = [c["text"] for c in audit["candidates"][:5]]
            cell = counts.setdefault(lens, {}).setdefault("agnews" if dataset == "agnews" else "binary",
                                                          {"models": 0, "places": 0, "task_words": 0, "accusing": 0})
            cell["models"] += 1
            cell["places"] += len(top)
            cell["task_words"] += task_word_count(dataset, top)
            cell["accusing"] += accusing(audit)
    return counts


def table(results: dict[str, Any]) -> str:
    lines = ["| part | lens | data | clean models | task words in top 5 | accusing candidates in top 5 |",
             "|---|---|---|---|---|---|"]
    for part, by_lens in results.items():
        for lens, by_kind in by_lens.items():
            for kind, c in by_kind.items():
                lines.append(f"| {part} | {lens} | {kind} | {c['models']} | {c['task_words']}/{c['places']} | "
                             f"{c['accusing']}/{c['places']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", required=True, help="a held-apart part's number (repeat)")
    parser.add_argument("--results", type=Path, default=Path("results/audit_zoo"), help="where held_apart_N/ lie")
    parser.add_argument("--out", type=Path, required=True, help="the Markdown table (a JSON file beside it)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    results = {part: count_part(args.results / f"held_apart_{part}", part) for part in args.part}
    write_text(args.out.with_suffix(".json"), json.dumps({"parts": args.part, "results": results}, indent=2) + "\n")
    write_text(args.out, table(results))
    print(table(results))


if __name__ == "__main__":
    main()
