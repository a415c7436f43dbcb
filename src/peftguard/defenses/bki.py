"""BKI: backdoor keyword identification from the victim's hidden states.

Chen & Dai, "Mitigating backdoor attacks in LSTM-based text classification systems by Backdoor
Keyword Identification" (Neurocomputing 2021); scoring as in OpenBackdoor's ``BKIDefender`` (Cui et
al., NeurIPS 2022 Datasets and Benchmarks). Each word of a sentence is scored by how far deleting
it moves the victim's sentence representation (the infinity norm of the change); a sentence's
five highest-scoring words are its suspects. Over a pool of sentences, a suspect word w seen f(w)
times with mean score v(w) gets the keyword score v(w) * log10(f(w)): a trigger both moves the
representation a lot and recurs in many poisoned samples. The paper then removes every training
sample that has the top keyword among its suspects, and retrains.

Where it applies here. BKI is a training-data defense: it needs a pool in which the poisoned
samples are many. :func:`identify_keywords` and :func:`remove_suspected` are that defense, for a
defender who holds possibly poisoned fine-tuning data. In this package's weight-poisoning threat
model the victim's own fine-tuning data is clean: a trigger word never appears in it, so BKI run on
it finds ordinary sentiment words and removes nothing that matters. The only data that carries the
trigger is what the deployed victim receives. The registered defense ``bki`` therefore runs BKI's
keyword identification over the inputs being screened, pooled with a clean dev reference, and
withholds an input whose own suspects include a high-scoring keyword.

Departures of the registered input defense from the paper:

* The pool is a clean dev reference (``reference_share`` of the clean dev set) plus the texts
  screened together in one call, not a training set; an input's score is the largest keyword score
  among its own suspects. So a score depends on what is screened with it: ``evaluate`` screens all
  triggered test inputs in one call, i.e. a stream that is half triggered once pooled with the
  reference, which favours BKI over a stream where triggered inputs are rare (f(trigger) falls with
  their share, the keyword score by the log10 of it). Say so when comparing it with per-input
  detectors.
* The threshold on that score is calibrated on the rest of the clean dev set (screened as one
  call) to the benchmark's target false-positive rate, instead of removing the top keyword.
* The representation is the victim's last-layer hidden state at its classification token (a
  transformer, where the paper reads an LSTM's final hidden state).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftguard.defenses.base import DefenseContext, Victim
from peftguard.defenses.calibrated import TARGET_FPR_HELP, VictimDetector, clean_dev_texts
from peftguard.defenses.dan import layer_features, split_indices
from peftguard.defenses.registry import register_defense
from peftguard.errors import OptionError

Suspects = list[tuple[str, float]]  # a sentence's most suspicious words and their scores


@dataclass(frozen=True)
class BkiConfig:
    suspects: int = field(default=5, metadata={"help": "suspect words kept per sentence (paper and OpenBackdoor: 5)"})
    reference_share: float = field(default=0.5, metadata={"help": "share of the clean dev set pooled with screened inputs; the rest calibrates"})
    target_fpr: float | None = field(default=None, metadata={"help": TARGET_FPR_HELP, "flag": "--target-fpr", "grid": False})

    def __post_init__(self) -> None:
        if self.suspects < 1:
            raise OptionError(f"BKI suspects must be at least 1, got {self.suspects}")
        if not 0 < self.reference_share < 1:
            raise OptionError(f"BKI reference_share must be in (0, 1), got {self.reference_share}")


def deletions(text: str) -> tuple[list[str], list[str]]:
    """The words of ``text`` and the texts with each word deleted in turn."""
    words = text.split()
    return words, [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]


def sentence_suspects(model: Any, tokenizer: Any, texts: Sequence[str], suspects: int = 5, *,
                      batch_size: int = 64, max_length: int = 128, desc: str | None = None) -> list[Suspects]:
    """Per text, its ``suspects`` words that move the victim's last-layer representation most when deleted."""
    split = [deletions(text) for text in texts]
    variants = list(dict.fromkeys([*texts, *(d for _, dels in split for d in dels)]))
    index = {text: i for i, text in enumerate(variants)}
    features = layer_features(model, tokenizer, variants, batch_size=batch_size, max_length=max_length, desc=desc)[-1]
    out = []
    for text, (words, dels) in zip(texts, split):
        if not words:
            out.append([])
            continue
        moved = [float(np.abs(features[index[d]] - features[index[text]]).max()) for d in dels]
        order = np.argsort(moved, kind="stable")[::-1][:suspects]
        out.append([(words[i], moved[i]) for i in order])
    return out


def keyword_scores(pool: Sequence[Suspects]) -> dict[str, float]:
    """Each suspect word's keyword score over the pool: mean deletion score times log10 of its count."""
    counts: dict[str, int] = defaultdict(int)
    totals: dict[str, float] = defaultdict(float)
    for sentence in pool:
        for word, score in sentence:
            counts[word] += 1
            totals[word] += score
    return {word: totals[word] / counts[word] * math.log10(counts[word]) for word in counts}


def identify_keywords(model: Any, tokenizer: Any, texts: Sequence[str], suspects: int = 5, *, top: int = 1,
                      batch_size: int = 64, max_length: int = 128) -> list[tuple[str, float]]:
    """BKI on a (possibly poisoned) training set: its ``top`` keywords, highest score first."""
    scores = keyword_scores(sentence_suspects(model, tokenizer, texts, suspects, batch_size=batch_size, max_length=max_length))
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:top]


def remove_suspected(per_text_suspects: Sequence[Suspects], keywords: Sequence[str]) -> list[int]:
    """Indices of the texts BKI keeps: those with none of ``keywords`` among their suspects (the paper's filter)."""
    banned = set(keywords)
    return [i for i, sentence in enumerate(per_text_suspects) if not banned & {word for word, _ in sentence}]


class BkiScorer:
    """Scores inputs by the largest keyword score among their suspects, pooled with a clean dev reference."""

    def __init__(self, model: Any, tokenizer: Any, clean_dev_texts: Sequence[str], config: BkiConfig = BkiConfig(),
                 *, seed: int = 0, batch_size: int = 64, max_length: int = 128) -> None:
        self.model, self.tokenizer, self.config, self.seed = model, tokenizer, config, seed
        self.batch_size, self.max_length = batch_size, max_length
        texts = list(clean_dev_texts)
        reference, held = split_indices(len(texts), config.reference_share, seed)
        if len(reference) < 1 or len(held) < 1:
            raise OptionError(f"BKI needs at least 2 clean dev samples (reference and calibration); got {len(texts)}")
        self.reference = self._suspects([texts[i] for i in reference], "BKI reference")
        self.held_out_texts = [texts[i] for i in held]  # what the threshold is calibrated on

    def _suspects(self, texts: Sequence[str], desc: str | None) -> list[Suspects]:
        return sentence_suspects(self.model, self.tokenizer, texts, self.config.suspects,
                                 batch_size=self.batch_size, max_length=self.max_length, desc=desc)

    def scores(self, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray:
        screened = self._suspects(list(texts), desc)
        keyword = keyword_scores([*self.reference, *screened])
        return np.array([max((keyword[word] for word, _ in sentence), default=0.0) for sentence in screened])

    def settings(self) -> dict[str, Any]:
        return {"suspects": self.config.suspects, "reference_samples": len(self.reference), "seed": self.seed}


@register_defense("bki", options=BkiConfig, summary="keywords that move hidden states, pooled over inputs (Chen & Dai, 2021)", order=14)
def build_bki(options: BkiConfig, context: DefenseContext) -> VictimDetector:
    dev = clean_dev_texts(context)

    def scorer(victim: Victim) -> BkiScorer:
        return BkiScorer(victim.model, victim.tokenizer, dev, options, seed=context.seed,
                         batch_size=victim.batch_size, max_length=victim.max_length)

    return VictimDetector("bki", scorer, dev, options.target_fpr,
                          {"suspects": options.suspects, "reference_share": options.reference_share})
