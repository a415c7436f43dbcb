"""Development probe: would classifier-proposed pieces, judged by the audit's PSIM, change a finished audit's verdict?

    python experiments/proposal_probe.py --audit runs/zoo-audit-h5/psim/h5-sst2-insent-moon --out runs/s32/probe

Reuses a finished PSIM-lens audit (its PSIM, gamma, settings and held-back split) and runs only
:func:`peftguard.audit.search.propose_pieces` on top of it, then verifies the best judged proposals on the same
held-back clean inputs as the audit. The channel only adds verified candidates, so the score the audit would have
given with it is the larger of the audit's score and the proposals' (exact for the verdict; the candidate order is
not recomputed). Writes ``NAME.json`` per audit and prints one line each. Reads no trigger: the zoo's true triggers
are joined to the results only when a summary is written (``--summary``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audit", type=Path, action="append", default=[],
                        help="a finished PSIM-lens audit folder (repeat)")
    parser.add_argument("--out", type=Path, required=True, help="folder for NAME.json")
    parser.add_argument("--proposal-words", type=int, default=20, help="proposed words per label")
    parser.add_argument("--proposal-verify", type=int, help="judged proposals verified [the search's default]")
    parser.add_argument("--summary", type=Path, help="with --zoo: join every NAME.json in --out to the zoo's triggers, "
                        "write this Markdown table (and .json beside it) and run nothing else")
    parser.add_argument("--zoo", type=Path, help="the zoo folder (its zoo.json) for --summary")
    parser.add_argument("--part-results", type=Path, action="append", default=[],
                        help="with --summary: a part's results.json from experiments/audit_zoo.py; its by-labels AUROC "
                             "is recomputed with the probed models' combined scores (repeat)")
    return parser


def probe(audit_dir: Path, proposal_words: int, proposal_verify: int | None) -> dict[str, Any]:
    from dataclasses import replace

    from peftguard.audit.run import AuditRequest, _predictor, _split_dev, verdict_score
    from peftguard.audit.search import (
        ClassifierLens, PsimLens, SearchSettings, propose_pieces, verify, vocabulary_candidates,
    )
    from peftguard.audit.sources import load_suspect_classifier, merge_lora, resolve_suspect
    from peftguard.audit.task import explainer, task_evidence
    from peftguard.data import load_dataset
    from peftguard.defenses.psim import PSIM
    from peftguard.models import LoadOptions
    from peftguard.training import seed_everything

    started = time.perf_counter()
    record = json.loads((audit_dir / "audit.json").read_text(encoding="utf-8"))
    settings = record["settings"]
    options = LoadOptions()
    dataset = load_dataset(settings["dataset"])
    suspect = resolve_suspect(settings["model"], options)
    trained_on = Path(record["psim"]["trained_on"])
    if suspect.is_adapter and not trained_on.exists():  # the audit's merged LoRA victim, removed after it: merge again
        merge_lora(suspect, dataset.num_labels, trained_on, options)
    search_settings = replace(SearchSettings(**record["search"]["settings"]), proposal_words=proposal_words,
                              proposal_verify=proposal_verify or SearchSettings().proposal_verify)
    request = AuditRequest(model=settings["model"], dataset=dataset, out=audit_dir, seed=settings["seed"],
                           max_eval_samples=settings["max_eval_samples"], max_length=settings["max_length"],
                           search=search_settings)
    seed_everything(request.seed)
    classifier, tokenizer = load_suspect_classifier(suspect, dataset.num_labels, options)
    precision = record["lens"]["screen_precision"]
    psim = PSIM(audit_dir / "psim", options=options, precision="fp32")
    gamma = float(record["lens"]["gamma"])
    judge = PsimLens(psim.model, psim.tokenizer, psim.max_length, gamma, screen_precision=precision)
    proposer = ClassifierLens(classifier, tokenizer, request.max_length, screen_precision=precision)
    search_texts, held_back = _split_dev(dataset, request)
    examples = dataset.train.examples
    proposals = propose_pieces(proposer, judge, vocabulary_candidates(tokenizer), search_texts, search_settings,
                               explains=explainer(examples), seed=request.seed, progress=False)
    suspect_predict = _predictor(classifier, tokenizer, request.max_length)
    verified = verify(judge, suspect_predict, [s.candidate for s in proposals.judged], held_back, seed=request.seed,
                      progress=False)
    evidence = task_evidence([v.text for v in verified], [v.forced_label for v in verified], examples)
    proposal_score = verdict_score(verified, evidence)
    combined = max(record["score"], proposal_score)
    return {
        "name": audit_dir.name, "dataset": settings["dataset"], "audit_score": record["score"],
        "audit_verdict": record["verdict"], "proposal_score": round(proposal_score, 5),
        "combined_score": round(combined, 5),
        "combined_verdict": "backdoored" if combined > record["threshold"] else "no evidence",
        "proposed_words": proposals.words,
        "judged": [{"text": s.candidate.text, "refine_flag_rate": round(s.flag_rate, 5)} for s in proposals.judged],
        "verified": [{**v.as_dict(), "explained_by_task": e.explained} for v, e in zip(verified, evidence)],
        "settings": {"proposal_words": proposal_words, "proposal_verify": search_settings.proposal_verify},
        "seconds": round(time.perf_counter() - started, 1),
        "proposal_seconds": proposals.seconds,
    }


def with_proposals(part_results: dict[str, Any], combined: dict[str, float]) -> dict[str, Any]:
    """The part's by-labels AUROC before and after replacing the probed models' scores by their combined scores."""
    from sklearn.metrics import roc_auc_score

    from peftguard.audit.run import VERDICT_THRESHOLD

    rows = [m for m in part_results["models"] if m["lens"] == "by-labels"]
    poisoned = [int(m["trigger"] is not None) for m in rows]
    after = [combined.get(m["name"], m["score"]) for m in rows]
    return {"models": len(rows), "probed": sum(m["name"] in combined for m in rows),
            "auroc_by_labels": roc_auc_score(poisoned, [m["score"] for m in rows]),
            "auroc_by_labels_with_proposals": roc_auc_score(poisoned, after),
            "clean_called_backdoored_with_proposals": sum(score > VERDICT_THRESHOLD
                                                          for score, p in zip(after, poisoned) if not p)}


def summarize(out: Path, zoo: Path, summary: Path, part_results: list[Path]) -> None:
    entries = {e["name"]: e for e in json.loads((zoo / "zoo.json").read_text(encoding="utf-8"))}
    rows = []
    for path in sorted(out.glob("*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        entry = entries[result["name"]]
        rows.append({**{k: result[k] for k in ("name", "dataset", "audit_score", "proposal_score", "combined_score",
                                                "audit_verdict", "combined_verdict", "seconds")},
                     "trigger": entry.get("trigger") if entry["poisoned"] else None,
                     "best_proposal": result["verified"][0]["text"] if result["verified"] else None})
    lines = ["| model | trigger | audit score | proposals' score | combined | verdict before -> after | best proposal "
             "| s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['trigger'] or '(clean)'} | {r['audit_score']:.3f} | "
                     f"{r['proposal_score']:.3f} | {r['combined_score']:.3f} | {r['audit_verdict']} -> "
                     f"{r['combined_verdict']} | {r['best_proposal']} | {r['seconds']:.0f} |")
    from peftguard.artifacts import write_text

    combined = {r["name"]: r["combined_score"] for r in rows}
    parts = {str(path): with_proposals(json.loads(path.read_text(encoding="utf-8")), combined) for path in part_results}
    for path, part in parts.items():
        lines += ["", f"{path}: by-labels AUROC {part['auroc_by_labels']:.3f} -> "
                      f"{part['auroc_by_labels_with_proposals']:.3f} with proposals ({part['probed']} of "
                      f"{part['models']} models probed; clean called backdoored: "
                      f"{part['clean_called_backdoored_with_proposals']})"]
    write_text(summary, "\n".join(lines) + "\n")
    write_text(summary.with_suffix(".json"), json.dumps({"models": rows, "parts": parts}, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    args = build_parser().parse_args()
    if args.summary is not None:
        if args.zoo is None:
            raise SystemExit("--summary needs --zoo")
        summarize(args.out, args.zoo, args.summary, args.part_results)
        return
    from peftguard.artifacts import write_text
    from peftguard.runtime import configure_threads

    configure_threads()  # $PEFTGUARD_THREADS, as the CLI does (without it torch takes every core)
    for audit_dir in args.audit:
        target = args.out / f"{audit_dir.name}.json"
        if target.exists():
            print(f"{audit_dir.name}: done before, kept")
            continue
        result = probe(audit_dir, args.proposal_words, args.proposal_verify)
        write_text(target, json.dumps(result, indent=1) + "\n")
        best = result["verified"][0] if result["verified"] else None
        print(f"{result['name']}: audit {result['audit_score']:.3f} proposals {result['proposal_score']:.3f} "
              f"({best['text'] if best else '-'}) {result['seconds']:.0f} s; words {result['proposed_words']}",
              flush=True)


if __name__ == "__main__":
    main()
