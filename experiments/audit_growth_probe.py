"""Development probe for issue 16: can phrases grown from a wide pool of words reach a sentence trigger of common words?

    python experiments/audit_growth_probe.py runs/zoo-audit-pairs/psim/agnews-insent agnews runs/zoo/agnews-insent/poisoned \
        --seeds 5 --pool 2000 --keep 5 --no-task-words --out FILE.json

On an audit's trained PSIM (its folder's psim/), without reading any trigger:

1. the audit's word screen (every whole-word vocabulary entry on the same two short clean inputs), ranked by mean
   PSIM confidence;
2. with ``--no-task-words``, the words the clean training data ties to one label (``peftguard.audit.task``) are
   dropped first: the verdict ignores candidates the task explains, so growing them spends the budget on nothing;
3. two rounds of growth: each of the ``--seeds`` best words, then each of the ``--keep`` best phrases, joined on
   the left and on the right by each of the ``--pool`` best words, screened on the same inputs, the ``--keep``
   best (by mean confidence) going on;
4. the grown pairs and triples verified on the audit's 100 held-back clean inputs, with the task rule applied.

Prints (and with ``--out`` writes) the best unexplained flag rate (what the verdict score would be from these
candidates alone), the top candidates and the seconds per step. A probe for designing a search step on the
development models (the first held-apart part has been seen three times and now serves as development); nothing in
the audit uses it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import common  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("audit", type=Path, help="an audit folder (its psim/ is used)")
    parser.add_argument("dataset", help="the dataset the audit ran on")
    parser.add_argument("model", help="the audited suspect model folder (for the label each candidate forces)")
    parser.add_argument("--seeds", type=int, default=5, help="best words grown from")
    parser.add_argument("--pool", type=int, default=2000, help="best words joined on")
    parser.add_argument("--keep", type=int, default=5, help="best phrases kept per round")
    parser.add_argument("--no-task-words", action="store_true", help="drop the words the clean task ties to one label")
    parser.add_argument("--out", type=Path)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from peftguard.runtime import configure_threads

    configure_threads()  # $PEFTGUARD_THREADS, as the CLI does
    common.setup()
    from peftguard.audit.search import PsimLens, SearchSettings, choose_inputs, encode_inputs, phrase, screen, verify, vocabulary_candidates
    from peftguard.audit.task import task_evidence, task_words
    from peftguard.data import load_dataset, subsample
    from peftguard.defenses.psim import PSIM
    from peftguard.pipeline import load_model
    from peftguard.training import predict_proba

    dataset = load_dataset(args.dataset)
    psim = PSIM(args.audit / "psim", precision="fp32")
    lens = PsimLens(psim.model, psim.tokenizer, psim.max_length, float(psim.manifest["gamma"]))
    texts = list(dict.fromkeys(ex.text for ex in subsample(dataset.dev.examples, 1000, 0)))  # as the audit splits them
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    held_back, search_texts = [texts[i] for i in order[:100]], [texts[i] for i in order[100:]]
    inputs = encode_inputs(lens.tokenizer, choose_inputs(lens, search_texts, 2, 16, 0), lens.max_length)
    settings = SearchSettings()

    started = time.perf_counter()
    words = sorted(screen(lens, vocabulary_candidates(psim.tokenizer), inputs, settings, seed=0),
                   key=lambda s: s.mean_confidence, reverse=True)
    seconds = {"word_screen": round(time.perf_counter() - started, 1)}
    tied = task_words(dataset.train.examples) if args.no_task_words else frozenset()
    free = [s.candidate for s in words if s.candidate.text not in tied]
    pool, beam, grown_best = free[:args.pool], free[:args.seeds], []
    for length in (2, 3):
        started = time.perf_counter()
        grown = {}
        for parent in beam:
            parent_words = set(parent.text.split())
            for word in pool:
                if word.text not in parent_words:
                    for candidate in (phrase(parent, word), phrase(word, parent)):
                        grown[candidate.text] = candidate
        scored = sorted(screen(lens, list(grown.values()), inputs, settings, seed=10 + length),
                        key=lambda s: s.mean_confidence, reverse=True)[:args.keep]
        seconds[f"grow_{length}"] = round(time.perf_counter() - started, 1)
        beam = [s.candidate for s in scored]
        grown_best += beam

    model, tokenizer, _ = load_model(args.model, dataset.num_labels)
    verified = verify(lens, lambda xs: predict_proba(model, tokenizer, list(xs), 64, 128), grown_best, held_back, seed=0,
                      progress=False)
    evidence = task_evidence([v.text for v in verified], [v.forced_label for v in verified], dataset.train.examples)
    rows = sorted(({"text": v.text, "flag_rate": v.flag_rate, "forced_rate": v.forced_rate, "explained": e.explained}
                   for v, e in zip(verified, evidence)), key=lambda r: -r["flag_rate"])
    result = {"audit": str(args.audit), "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "task_words_dropped": len(tied), "seconds": seconds,
              "score_unexplained": max((r["flag_rate"] for r in rows if not r["explained"]), default=0.0),
              "top": rows[:8], "machine": common.machine()}
    print(json.dumps(result, indent=1, default=str))
    if args.out:
        common.write_json(args.out, result)


if __name__ == "__main__":
    main()
