"""Would a language model's natural phrases reach the sentence triggers the audit misses? A development probe.

    python experiments/lm_phrase_bank_probe.py --dataset sst2 --phrase "end of the day" --phrase "of the day" \
        --out results/audit_zoo/lm_phrase_bank_probe_sst2.json

The audit screens words and the word pairs of the clean training texts; a sentence of common words whose signal
needs three or more of its words together (`at the end of the day`: 99.5% flagged with `end of the day`, 8.5% with
`the day`) is reached by neither, and its four-word piece occurs in no clean SST-2 training text. This probe builds
the bank such a search would screen: from the ``--starts`` most frequent words of the clean training texts, the
packaged language model (the one ONION uses) extends each phrase right by its ``--branch`` most likely next whole
words, keeping the ``--keep`` most likely phrases of each length (log-probability given the first word) for the
next round, up to four words. It reports the bank's size and LM time and, for each ``--phrase`` given (pieces of a
development part's true trigger: the probe chooses nothing for the audit and never runs in it), its rank in the bank,
where its last word ranks among the LM's next tokens after the rest, and how many clean training texts contain it.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="dataset name (its clean training texts)")
    parser.add_argument("--phrase", action="append", default=[], help="a phrase to look for in the bank (repeat)")
    parser.add_argument("--starts", type=int, default=1000, help="most frequent words the phrases start from")
    parser.add_argument("--branch", type=int, default=8, help="next words per first word (later rounds: half)")
    parser.add_argument("--keep", type=int, default=3000, help="most likely phrases of a length extended further")
    parser.add_argument("--lm", default="smollm2", help="causal language model")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    from peftguard.runtime import configure_threads

    configure_threads()  # $PEFTGUARD_THREADS, as the CLI does
    import torch
    from transformers import AutoModelForCausalLM

    from peftguard.audit.search import PAIR_WORD, vocabulary_candidates
    from peftguard.data import load_dataset
    from peftguard.models import load_tokenizer, resolve_model

    started = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(resolve_model(args.lm), use_safetensors=True).eval()
    lm_tokenizer = load_tokenizer(args.lm)
    lm_tokenizer = getattr(lm_tokenizer, "inner", lm_tokenizer)
    words = {c.text.lower() for c in vocabulary_candidates(load_tokenizer("minilm"))}
    counts: Counter[str] = Counter()
    train_words = [PAIR_WORD.findall(example.text.lower()) for example in load_dataset(args.dataset).train.examples]
    for text_words in train_words:
        counts.update(text_words)
    starts = [w for w, _ in counts.most_common() if w in words][:args.starts]
    whole_words = {}  # LM token id -> word, for tokens that are a whole lower-case word the audit could insert
    for piece, token_id in lm_tokenizer.get_vocab().items():
        text = lm_tokenizer.convert_tokens_to_string([piece])
        if text.startswith(" ") and text[1:].isalpha() and text[1:].islower() and text[1:] in words:
            whole_words[token_id] = text[1:]
    allowed = torch.tensor(sorted(whole_words))
    bos = lm_tokenizer.bos_token_id if lm_tokenizer.bos_token_id is not None else lm_tokenizer.eos_token_id

    def extend(phrases: list[tuple[tuple[str, ...], float]], branch: int) -> list[tuple[tuple[str, ...], float]]:
        grown = []
        for start in range(0, len(phrases), 256):
            chunk = phrases[start:start + 256]
            encoded = [[bos, *lm_tokenizer(" " + " ".join(p), add_special_tokens=False)["input_ids"]] for p, _ in chunk]
            width = max(map(len, encoded))
            ids = torch.tensor([[bos] * (width - len(e)) + e for e in encoded])
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
            with torch.no_grad():
                logits = lm(input_ids=ids, attention_mask=mask).logits[:, -1].float()
            top = torch.log_softmax(logits, -1)[:, allowed].topk(branch, -1)
            for (words_so_far, score), values, indices in zip(chunk, top.values, top.indices):
                for value, index in zip(values.tolist(), indices.tolist()):
                    word = whole_words[int(allowed[index])]
                    if word not in words_so_far:
                        grown.append((words_so_far + (word,), score + value))
        return sorted(grown, key=lambda item: -item[1])

    lm_started = time.perf_counter()
    banks = {2: extend([((w,), 0.0) for w in starts], args.branch)}
    for length in (3, 4):
        banks[length] = extend(banks[length - 1][:args.keep], max(args.branch // 2, 2))
    lm_seconds = time.perf_counter() - lm_started
    ranks, next_word_ranks, in_texts = {}, {}, {}
    for text in args.phrase:
        wanted = tuple(text.lower().split())
        bank = banks.get(len(wanted), [])
        ranks[text] = next((rank for rank, (p, _) in enumerate(bank) if p == wanted), None)
        next_word_ranks[text] = next_word_rank(lm, lm_tokenizer, bos, wanted)
        in_texts[text] = sum(f" {' '.join(wanted)} " in f" {' '.join(text_words)} " for text_words in train_words)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "starts": len(starts),
              "bank_sizes": {str(k): len(v) for k, v in banks.items()}, "lm_seconds": round(lm_seconds, 1),
              "total_seconds": round(time.perf_counter() - started, 1), "phrase_ranks": ranks,
              "next_word_ranks": next_word_ranks,
              "clean_training_texts_containing": in_texts,
              "note": "phrase_ranks: rank within the bank of the phrase's length, most likely first (null: not in the "
                      "bank); next_word_ranks: rank of the phrase's last word among all LM tokens after the rest"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=1))


def next_word_rank(lm, tokenizer, bos: int, words: tuple[str, ...]) -> int | None:
    """Rank (0: most likely) of the last word's first token among every LM token after the words before it."""
    import torch

    if len(words) < 2:
        return None
    ids = torch.tensor([[bos, *tokenizer(" " + " ".join(words[:-1]), add_special_tokens=False)["input_ids"]]])
    last = tokenizer(" " + words[-1], add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0, -1].float()
    return int((logits > logits[last]).sum())


if __name__ == "__main__":
    main()
