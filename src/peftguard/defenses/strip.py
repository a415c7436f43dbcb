"""STRIP for text: inputs whose prediction survives heavy perturbation carry a trigger.

Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks" (ACSAC 2019); the text
version follows OpenBackdoor's ``STRIPDefender`` (Cui et al., NeurIPS 2022 Datasets and Benchmarks):
each input is copied ``repeat`` times, and in each copy ``swap_ratio`` of its word positions
(drawn with replacement) are overwritten by the highest-TF-IDF words of a randomly drawn clean dev
sentence. A trigger keeps forcing its label through the noise, so the victim's prediction entropy,
averaged over the copies, is low for triggered inputs and high for clean ones.

Settings: ``repeat`` 5 and ``swap_ratio`` 0.5 as in OpenBackdoor. Departures:

* The threshold is calibrated on clean dev inputs to the benchmark's target false-positive rate
  (OpenBackdoor: a false-rejection rate of 1%), like every detector here.
* The suspicion score is the negative mean entropy (higher = more suspicious), so that one
  thresholding rule serves every detector.
* OpenBackdoor can index past a sentence's non-zero TF-IDF words (then it writes arbitrary
  vocabulary words); here replacement words cycle through the sentence's own non-zero words.
* Perturbations are seeded per input, so a score does not depend on batch order.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftguard.defenses.base import DefenseContext, Victim
from peftguard.defenses.calibrated import TARGET_FPR_HELP, VictimDetector, clean_dev_texts
from peftguard.defenses.registry import register_defense
from peftguard.errors import OptionError
from peftguard.inference import predict_proba


@dataclass(frozen=True)
class StripConfig:
    repeat: int = field(default=5, metadata={"help": "perturbed copies per input (OpenBackdoor: 5)"})
    swap_ratio: float = field(default=0.5, metadata={"help": "share of word positions overwritten per copy (OpenBackdoor: 0.5)"})
    target_fpr: float | None = field(default=None, metadata={"help": TARGET_FPR_HELP, "flag": "--target-fpr", "grid": False})

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise OptionError(f"STRIP repeat must be at least 1, got {self.repeat}")
        if not 0 < self.swap_ratio <= 1:
            raise OptionError(f"STRIP swap_ratio must be in (0, 1], got {self.swap_ratio}")


class SubstitutionWords:
    """Per clean sentence, its words ordered by TF-IDF (highest first): the material copies are overwritten with."""

    def __init__(self, clean_texts: Sequence[str]) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(use_idf=True, smooth_idf=True, norm=None, stop_words="english")
        try:
            matrix = vectorizer.fit_transform(list(clean_texts)).tocsr()
        except ValueError:  # scikit-learn: nothing but stop words
            raise OptionError("STRIP needs clean dev sentences with at least one content word") from None
        vocabulary = vectorizer.get_feature_names_out()
        self.pieces: list[list[str]] = []
        for row in range(matrix.shape[0]):
            start, stop = matrix.indptr[row], matrix.indptr[row + 1]
            order = np.argsort(-matrix.data[start:stop], kind="stable")
            words = [str(vocabulary[matrix.indices[start + i]]) for i in order]
            if words:
                self.pieces.append(words)


def perturb(text: str, words: SubstitutionWords, config: StripConfig, rng: np.random.Generator) -> str:
    tokens = text.split()
    if not tokens:
        return text
    piece = words.pieces[rng.integers(len(words.pieces))]
    swaps = int(len(tokens) * config.swap_ratio)
    for i, position in enumerate(rng.integers(0, len(tokens), swaps)):
        tokens[position] = piece[i % len(piece)]
    return " ".join(tokens)


def prediction_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy in bits of each row of class probabilities."""
    p = np.clip(probabilities, 1e-12, 1.0)
    return -(p * np.log2(p)).sum(axis=-1)


class StripScorer:
    """Scores inputs by the negative mean prediction entropy of the victim over perturbed copies."""

    def __init__(self, model: Any, tokenizer: Any, clean_dev_texts: Sequence[str], config: StripConfig = StripConfig(),
                 *, seed: int = 0, batch_size: int = 64, max_length: int = 128) -> None:
        self.model, self.tokenizer, self.config, self.seed = model, tokenizer, config, seed
        self.batch_size, self.max_length = batch_size, max_length
        self.words = SubstitutionWords(clean_dev_texts)

    def copies(self, text: str) -> list[str]:
        rng = np.random.default_rng([self.seed, _text_seed(text)])
        return [perturb(text, self.words, self.config, rng) for _ in range(self.config.repeat)]

    def scores(self, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray:
        perturbed = [copy for text in texts for copy in self.copies(text)]
        probabilities = predict_proba(self.model, self.tokenizer, perturbed, self.batch_size, self.max_length, desc=desc)
        entropy = prediction_entropy(probabilities).reshape(len(texts), self.config.repeat)
        return -entropy.mean(axis=1)

    def settings(self) -> dict[str, Any]:
        return {"repeat": self.config.repeat, "swap_ratio": self.config.swap_ratio, "seed": self.seed}


def _text_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()[:4], "little")


@register_defense("strip", options=StripConfig, summary="low prediction entropy under word swaps (Gao et al., 2019)", order=10)
def build_strip(options: StripConfig, context: DefenseContext) -> VictimDetector:
    dev = clean_dev_texts(context)

    def scorer(victim: Victim) -> StripScorer:
        return StripScorer(victim.model, victim.tokenizer, dev, options, seed=context.seed,
                           batch_size=victim.batch_size, max_length=victim.max_length)

    return VictimDetector("strip", scorer, dev, options.target_fpr, {"repeat": options.repeat, "swap_ratio": options.swap_ratio})
