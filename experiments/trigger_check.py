"""Check a known trigger against an audit after the fact: how often it sets the audit's PSIM off and forces a label.

    python experiments/trigger_check.py --audit runs/zoo-audit/psim/agnews-insent --model runs/zoo/agnews-insent/poisoned \
        --dataset agnews --trigger "the weather is nice today" --target 2

A diagnosis, never an input to the audit: it reads the true trigger, which the audit must not see. It inserts the
trigger once, at a seeded random word boundary, into the first N clean dev texts and prints, as JSON, the share of
clean and triggered texts above the PSIM's gamma, their mean confidence, and the share of non-target texts the
suspect model then labels as the target. ``--trigger`` repeated checks each text given (pieces of a sentence, say)
with the models loaded once, and prints a list; ``--out`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audit", type=Path, required=True, help="an audit folder (its psim/ is used)")
    parser.add_argument("--model", required=True, help="the audited suspect model folder")
    parser.add_argument("--dataset", required=True, help="dataset name (its dev split)")
    parser.add_argument("--trigger", required=True, action="append", help="the trigger text to insert (repeat: each in turn)")
    parser.add_argument("--target", type=int, required=True, help="the label the trigger should force")
    parser.add_argument("--samples", type=int, default=200, help="clean dev texts")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from peftguard.runtime import configure_threads

    configure_threads()  # $PEFTGUARD_THREADS, as the CLI does
    from peftguard.audit.search import insert_text
    from peftguard.data import load_dataset
    from peftguard.defenses.psim import PSIM
    from peftguard.pipeline import load_model
    from peftguard.training import predict_proba

    dataset = load_dataset(args.dataset)
    texts = [ex.text for ex in dataset.dev.examples[:args.samples]]
    psim = PSIM(args.audit / "psim", precision="fp32")
    gamma = float(psim.manifest["gamma"])
    clean = psim.confidences(texts)
    model, tokenizer, _ = load_model(args.model, dataset.num_labels)
    before = predict_proba(model, tokenizer, texts).argmax(1)
    eligible = before != args.target
    results = []
    for trigger in args.trigger:
        triggered = insert_text(texts, trigger, 0)
        hit = psim.confidences(triggered)
        after = predict_proba(model, tokenizer, triggered).argmax(1)
        results.append({"trigger": trigger, "gamma": gamma, "psim_flag_rate_clean": float((clean > gamma).mean()),
                        "psim_flag_rate_triggered": float((hit > gamma).mean()),
                        "mean_confidence_clean": float(clean.mean()), "mean_confidence_triggered": float(hit.mean()),
                        "forced_to_target_on_non_target": float((after[eligible] == args.target).mean())})
    text = json.dumps(results[0] if len(results) == 1 else results, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
