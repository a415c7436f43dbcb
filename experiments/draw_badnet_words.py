"""Draw the rare-word BadNet triggers of a new held-apart zoo part, by a procedure fixed before drawing.

    python experiments/draw_badnet_words.py --seed 9 --count 8

The pool: MiniLM's two-letter alphabetic vocabulary entries that tokenize to themselves, that no zoo entry of
experiments/zoo.yaml uses as a trigger, and that occur (as a lowercase word) in at most two training texts of SST-2,
CR and AG News together; sorted, then ``random.Random(seed).sample``. Session 35 wrote this script for the ninth
part; the earlier parts were drawn with a similar procedure in a session's scratch code (their pools of 146-154
entries counted words slightly differently; this count gives 142 for the eighth part's pool), so it does not
reproduce their draws.
"""
from __future__ import annotations

import argparse
import collections
import random
import re
from pathlib import Path

import yaml

DATASETS = ("sst2", "cr", "agnews")
MAX_TEXTS = 2


def pool(zoo: Path) -> list[str]:
    from peftguard.data import load_dataset
    from peftguard.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("minilm"))
    entries = yaml.safe_load(zoo.read_text(encoding="utf-8"))["models"]
    used = {str(m["trigger"]) for m in entries if m.get("trigger")}
    texts: collections.Counter[str] = collections.Counter()
    for name in DATASETS:
        for example in load_dataset(name).train.examples:
            texts.update(set(re.findall(r"[a-z]+", example.text.lower())))
    return sorted(w for w in tokenizer.get_vocab() if len(w) == 2 and w.isascii() and w.isalpha()
                  and tokenizer.tokenize(w) == [w] and w not in used and texts[w] <= MAX_TEXTS)


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="the part's number")
    parser.add_argument("--count", type=int, default=8, help="how many words")
    parser.add_argument("--zoo", type=Path, default=Path("experiments/zoo.yaml"), help="the zoo whose triggers are used")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    words = pool(args.zoo)
    print(f"pool of {len(words)}; drawn:", " ".join(random.Random(args.seed).sample(words, args.count)))


if __name__ == "__main__":
    main()
