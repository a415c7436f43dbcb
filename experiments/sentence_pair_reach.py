"""Which of the zoo's sentence triggers the audit's pair screen can reach, beside what the audit found.

    python experiments/sentence_pair_reach.py --out results/audit_zoo/sentence_pair_reach results/audit_zoo/X.json ...

The audit screens the ``pair_screen`` adjacent word pairs most frequent in the clean training texts
(:func:`peftguard.audit.search.text_pairs`), because a sentence of common words can set a PSIM off through a pair
while none of its words does alone. This counts, for every InSent model of experiments/zoo.yaml, the rank of each
of its sentence's adjacent pairs among all pairs of its dataset's clean training texts (null: the pair never
occurs there), and puts it beside the committed audit of that model: its verdict and whether a word of the sentence is
among its top 5 candidates (experiments/audit_zoo.py's test: any whitespace word, stop words included; the words
matched are listed). The audit files are read in the order given, a later one replacing an earlier one's
record of the same model. Nothing is trained or audited here; the only model read is the tokenizer (its vocabulary
decides which pairs the audit may screen).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_zoo import recovered  # noqa: E402
from zoo import load_zoo  # noqa: E402

from peftguard.audit.search import PAIR_WORD, SearchSettings, text_pairs, vocabulary_candidates  # noqa: E402


def pair_ranks(dataset: str, vocabulary: list[Any]) -> dict[str, int]:
    """Rank (1 = most frequent) of every adjacent pair of vocabulary words in the dataset's clean training texts."""
    from peftguard.data import load_dataset

    texts = (ex.text for ex in load_dataset(dataset).train.examples)
    return {pair.text: rank for rank, pair in enumerate(text_pairs(texts, vocabulary, 10**9), start=1)}


def latest_audits(paths: list[Path]) -> dict[str, dict[str, Any]]:
    audits: dict[str, dict[str, Any]] = {}
    for path in paths:
        for model in json.loads(path.read_text(encoding="utf-8"))["models"]:
            if model.get("lens", "psim") == "psim":
                audits[model["name"]] = {**model, "source": path.name}
    return audits


def reach_rows(entries: list[dict[str, Any]], audits: dict[str, dict[str, Any]], screened: int) -> list[dict[str, Any]]:
    from peftguard.models import DEFAULT_MODEL, load_tokenizer

    vocabulary = vocabulary_candidates(load_tokenizer(DEFAULT_MODEL))
    ranks_by_dataset: dict[str, dict[str, int]] = {}
    rows = []
    for entry in entries:
        if entry.get("attack") != "insent":
            continue
        dataset = entry["dataset"]
        if dataset not in ranks_by_dataset:
            ranks_by_dataset[dataset] = pair_ranks(dataset, vocabulary)
        words = PAIR_WORD.findall(entry["trigger"].lower())
        ranks = {f"{a} {b}": ranks_by_dataset[dataset].get(f"{a} {b}") for a, b in zip(words, words[1:])}
        found = [r for r in ranks.values() if r is not None]
        audit = audits.get(entry["name"])
        top5_words = {w for text in audit["top5"] for w in text.lower().split()} if audit else set()
        rows.append({
            "name": entry["name"], "part": entry["part"], "dataset": dataset, "trigger": entry["trigger"],
            "pair_ranks": ranks, "best_pair_rank": min(found, default=None),
            "pairs_screened": sum(r <= screened for r in found),
            "verdict": audit["verdict"] if audit else None,
            "sentence_word_in_top5": recovered(entry, audit["top5"], 5) if audit else None,
            "sentence_words_in_top5": sorted(top5_words & {w.lower() for w in entry["trigger"].split()}),
            "top5": audit["top5"] if audit else None, "audit_file": audit["source"] if audit else None,
        })
    return rows


def table(rows: list[dict[str, Any]], screened: int) -> str:
    lines = [f"| model | part | sentence | pairs in clean texts | best pair rank | pairs among the {screened} screened "
             "| verdict | sentence word in top 5 (which) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        present = sum(r is not None for r in row["pair_ranks"].values())
        audited = row["verdict"] is not None
        verdict = row["verdict"] or "no committed audit"
        lines.append(f"| {row['name']} | {row['part']} | {row['trigger']} | {present}/{len(row['pair_ranks'])} "
                     f"| {row['best_pair_rank'] or '-'} | {row['pairs_screened']} | {verdict} "
                     f"| {_found(row) if audited else '-'} |")
    return "\n".join(lines) + "\n"


def _found(row: dict[str, Any]) -> str:
    return f"yes ({', '.join(row['sentence_words_in_top5'])})" if row["sentence_word_in_top5"] else "no"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("audits", nargs="+", type=Path, help="committed audit_zoo result files (results.json layout)")
    parser.add_argument("--zoo", type=Path, default=Path(__file__).with_name("zoo.yaml"), help="the zoo config")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    _, entries = load_zoo(args.zoo)
    screened = SearchSettings().pair_screen
    rows = reach_rows(entries, latest_audits(args.audits), screened)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"pair_screen": screened, "models": rows}, indent=1) + "\n",
                                             encoding="utf-8")
    args.out.with_suffix(".md").write_text(table(rows, screened), encoding="utf-8")
    print(table(rows, screened))


if __name__ == "__main__":
    main()
