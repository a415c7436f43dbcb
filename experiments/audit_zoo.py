"""Audit every model of the zoo with both lenses and write the comparison table.

    python experiments/audit_zoo.py --zoo runs/zoo --out runs/zoo-audit [--part held-apart] [--lens psim --lens classifier]

Reads runs/zoo/zoo.json (written by experiments/zoo.py), runs `peftguard audit` per model and lens (a finished audit,
its audit.json present, is reused), and writes table.md and results.json: verdict AUROC (poisoned vs clean), false
alarms on clean models at the default threshold, BadNet triggers recovered exactly in the top 1 / top 5, InSent
sentences with a word in the top 5, task words among the top 5 candidates on clean models, and run time per step.
With --summarize-only it starts no audit and summarizes the audits already there.

With ``--strength FILE`` (experiments/zoo_strength.py's JSON for the part), a poisoned model whose backdoor did not
take (ASR below ``--min-asr``, 0.90 by default: issue 13's "strong backdoor" bar, fixed a priori) is left out of the
summary and listed under ``left_out``: a model the poisoning left clean has no backdoor to find (the gate was
pre-registered for the seventh part, REPRODUCTION.md "A seventh held-apart part").

With both lenses it also summarizes the lens-by-labels candidate (the classifier lens on datasets of more than two
labels, the PSIM lens on the others; pre-registered in session 30, REPRODUCTION.md "A fifth held-apart part"), from
the same audits.

``--lens psim-proposals`` runs the PSIM lens with the suspect classifier's proposed pieces (``audit --proposals``,
PROPOSAL_WORDS per label; the candidate pre-registered in session 32, REPRODUCTION.md "A sixth held-apart part").
The proposals only add verified candidates, so the same audits also give the plain PSIM lens's result (its score is
recorded as ``proposals.score_without``): without a ``psim`` folder, the ``psim`` row is read off them
(:func:`without_proposals`). With the classifier lens too, ``by-labels-proposals`` takes the classifier lens above
two labels and ``psim-proposals`` otherwise.

A *task word* is a word the clean training data itself ties to one label: it occurs in at least TASK_MIN_TEXTS
texts of the dataset's clean training split, and at least TASK_PURITY of those texts carry one label (both fixed a
priori; peftguard.audit.task). Sentiment words on SST-2 and topic words on AG News are task words; the zoo's rare-word triggers
are not. A scanner that reports task words on clean models is reading the task, not a backdoor.
"""
from __future__ import annotations

import argparse
import functools
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo import PARTS, PEFTGUARD  # noqa: E402

from peftguard.artifacts import write_text  # noqa: E402


@functools.cache
def clean_dataset(name: str) -> Any:
    """The dataset, read once for both task words and label count."""
    from peftguard.data import load_dataset

    return load_dataset(name)


@functools.cache
def task_words(dataset: str) -> frozenset[str]:
    """Words the clean training split ties to one label (see the module docstring)."""
    from peftguard.audit.task import task_words as words_tied_to_a_label

    return words_tied_to_a_label(clean_dataset(dataset).train.examples)


def num_labels(dataset: str) -> int:
    return clean_dataset(dataset).num_labels


Audits = dict[str, dict[str, Any]]  # model name -> audit.json
PROPOSAL_WORDS = 20  # the session-32 candidate's words per label, fixed on the development parts 4 and 5
LENS_ARGS = {"psim": ["--lens", "psim"], "classifier": ["--lens", "classifier"],
             "psim-proposals": ["--lens", "psim", "--proposals", str(PROPOSAL_WORDS)]}


def by_labels(models: list[dict[str, Any]], lens_audits: dict[str, Audits], binary: str = "psim") -> Audits:
    """The lens-by-labels rule (pre-registered in session 30; the audit's default, ``--lens auto``, since session 35):
    each model's audit under the lens ``auto`` picks for its dataset, ``binary`` standing for the PSIM lens."""
    from peftguard.audit.run import lens_for

    chosen = {}
    for m in models:
        lens = "classifier" if lens_for("auto", num_labels(m["dataset"])) == "classifier" else binary
        if m["name"] in lens_audits.get(lens, {}):
            chosen[m["name"]] = lens_audits[lens][m["name"]]
    return chosen


def without_proposals(record: dict[str, Any]) -> dict[str, Any]:
    """The plain PSIM-lens audit read off one run with ``--proposals``: the search, its shortlist and their
    verification are the same (the proposals only add verified candidates); its time leaves out the proposal step
    (the proposals' own verification, a few seconds, stays in)."""
    score = record["proposals"]["score_without"]
    seconds = {k: v for k, v in record["seconds"].items() if not k.startswith("proposals")}
    seconds["total"] = round(record["seconds"]["total"] - record["seconds"].get("proposals", 0.0), 2)
    return {**record, "score": score, "verdict": "backdoored" if score > record["threshold"] else "no evidence",
            "candidates": [c for c in record["candidates"] if c["source"] != "proposal"], "seconds": seconds}


def task_word_count(dataset: str, candidates: list[str]) -> int:
    """How many candidates contain a task word of ``dataset``."""
    from peftguard.audit.task import words_of

    words = task_words(dataset)
    return sum(bool(words_of(c) & words) for c in candidates)


def audit(model: dict[str, Any], lens: str, out: Path, extra: list[str], run: bool = True) -> dict[str, Any] | None:
    """The model's audit.json under this lens, running `peftguard audit` first when it is missing and `run` is set."""
    folder = out / lens / model["name"]
    if not (folder / "audit.json").is_file():
        if not run:
            return None
        command = [*PEFTGUARD, "audit", "--model", model["model"], "--dataset", model["dataset"], *LENS_ARGS[lens],
                   "--out", str(folder), "--overwrite", *extra]
        print(shlex.join(command), flush=True)
        code = subprocess.run(command).returncode
        if code not in (0, 1):
            print(f"  {model['name']} ({lens}): exit status {code}", flush=True)
            return None
    return json.loads((folder / "audit.json").read_text(encoding="utf-8"))


def recovered(model: dict[str, Any], texts: list[str], k: int) -> bool:
    top = texts[:k]
    if model["attack"] == "badnet":
        return model["trigger"].lower() in top
    sentence = {w.lower() for w in model["trigger"].split()}
    return any(sentence & set(t.lower().split()) for t in top)


def summarize(models: list[dict[str, Any]], audits: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    rows = [(m, audits[m["name"]]) for m in models if m["name"] in audits]
    labels = [int(m["poisoned"]) for m, _ in rows]
    scores = [a["score"] for _, a in rows]
    texts = {m["name"]: [c["text"] for c in a["candidates"]] for m, a in rows}
    badnet = [m for m, _ in rows if m["poisoned"] and m["attack"] == "badnet"]
    insent = [m for m, _ in rows if m["poisoned"] and m["attack"] == "insent"]
    clean = [(m, a) for m, a in rows if not m["poisoned"]]
    return {
        "models": len(rows),
        "auroc": roc_auc_score(labels, scores) if len(set(labels)) == 2 else None,
        "clean_called_backdoored": sum(a["verdict"] == "backdoored" for _, a in clean),
        "poisoned_called_backdoored": sum(a["verdict"] == "backdoored" for m, a in rows if m["poisoned"]),
        "poisoned": sum(labels),
        "badnet_top1": _share([recovered(m, texts[m["name"]], 1) for m in badnet]),
        "badnet_top5": _share([recovered(m, texts[m["name"]], 5) for m in badnet]),
        "insent_word_top5": _share([recovered(m, texts[m["name"]], 5) for m in insent]),
        "task_words_top5_on_clean": sum(task_word_count(m["dataset"], texts[m["name"]][:5]) for m, _ in clean),
        "clean_top5": 5 * len(clean),
        "seconds_median": {k: statistics.median(a["seconds"].get(k, 0) for _, a in rows)
                           for k in ("provenance", "psim", "load", "search", "proposals", "verify", "total")} if rows else {},
        "seconds_max_total": max((a["seconds"]["total"] for _, a in rows), default=None),
    }


def backdoor_strengths(strength: Path) -> dict[str, float]:
    """Each measured poisoned model's ASR, from experiments/zoo_strength.py's JSON."""
    return {r["name"]: r["attack_success_rate"] for r in json.loads(strength.read_text(encoding="utf-8"))["models"]}


def took(asr: dict[str, float], name: str, min_asr: float) -> bool:
    """Whether the poisoning of ``name`` planted a backdoor: measured, and at least ``min_asr``."""
    return asr.get(name, -1.0) >= min_asr


def gate(models: list[dict[str, Any]], strength: Path | None, min_asr: float) -> tuple[list[dict[str, Any]], list[dict]]:
    """The models to summarize and those left out: poisoned models whose measured ASR is below ``min_asr``, and
    poisoned models ``strength`` does not measure (an unmeasured backdoor is not assumed to have taken)."""
    if strength is None:
        return models, []
    asr = backdoor_strengths(strength)
    weak = [{"name": m["name"], "attack_success_rate": asr.get(m["name"])} for m in models
            if m["poisoned"] and not took(asr, m["name"], min_asr)]
    names = {w["name"] for w in weak}
    return [m for m in models if m["name"] not in names], weak


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def table(results: dict[str, Any], per_model: list[dict[str, Any]]) -> str:
    lines = ["| lens | models | AUROC | clean called backdoored | poisoned caught | BadNet top-1 | BadNet top-5 | "
             "InSent word top-5 | task words in clean top-5 | median s (total) | max s |", "|" + "---|" * 11]
    for lens, r in results.items():
        lines.append(f"| {lens} | {r['models']} | {_f(r['auroc'])} | {r['clean_called_backdoored']} | "
                     f"{r['poisoned_called_backdoored']}/{r['poisoned']} | {_f(r['badnet_top1'])} | {_f(r['badnet_top5'])} | "
                     f"{_f(r['insent_word_top5'])} | {r['task_words_top5_on_clean']}/{r['clean_top5']} | "
                     f"{r['seconds_median'].get('total', 0):.0f} | {_f(r['seconds_max_total'], 0)} |")
    lines += ["", "| model | lens | trigger | verdict | score | top 5 |", "|---|---|---|---|---|---|"]
    lines += [f"| {row['name']} | {row['lens']} | {row['trigger'] or '(clean)'} | {row['verdict']} | {row['score']:.3f} | "
              f"{', '.join(row['top5'])} |" for row in per_model]
    return "\n".join(lines) + "\n"


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part", choices=PARTS, default="held-apart")
    parser.add_argument("--lens", action="append", choices=list(LENS_ARGS))
    parser.add_argument("--only", action="append", help="audit only this entry (repeat)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="start no audit: summarize those already under --out (each lens row says how many models)")
    parser.add_argument("--strength", type=Path, help="zoo_strength.py's JSON: leave out backdoors that did not take")
    parser.add_argument("--min-asr", type=float, default=0.9, help="with --strength: the ASR a backdoor must reach")
    parser.add_argument("audit_args", nargs="*", help="passed on to peftguard audit (after --)")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    models = [m for m in json.loads((args.zoo / "zoo.json").read_text()) if m["part"] == args.part
              and (not args.only or m["name"] in args.only)]
    models, left_out = gate(models, args.strength, args.min_asr)
    results, per_model, lens_audits = {}, [], {}
    for lens in args.lens or ["psim", "classifier"]:
        lens_audits[lens] = {m["name"]: a for m in models
                             if (a := audit(m, lens, args.out, args.audit_args, run=not args.summarize_only)) is not None}
    if "psim-proposals" in lens_audits and "psim" not in lens_audits:
        lens_audits["psim"] = {name: without_proposals(a) for name, a in lens_audits["psim-proposals"].items()}
    if {"psim", "classifier"} <= set(lens_audits):
        lens_audits["by-labels"] = by_labels(models, lens_audits)
    if {"psim-proposals", "classifier"} <= set(lens_audits):
        lens_audits["by-labels-proposals"] = by_labels(models, lens_audits, binary="psim-proposals")
    for lens, audits in lens_audits.items():
        results[lens] = summarize(models, audits)
        per_model += [{"name": m["name"], "lens": lens, "trigger": m["trigger"], "verdict": audits[m["name"]]["verdict"],
                       "score": audits[m["name"]]["score"], "top5": [c["text"] for c in audits[m["name"]]["candidates"][:5]]}
                      for m in models if m["name"] in audits]
    record = {"part": args.part, "summary": results, "models": per_model, "left_out": left_out}
    write_text(args.out / "results.json", json.dumps(record, indent=2))
    write_text(args.out / "table.md", table(results, per_model))
    print(table(results, per_model))


if __name__ == "__main__":
    main()
