"""MDP: masking-differential prompting. A triggered input's output moves far more under random masking.

Xi et al., "Defending Pre-trained Language Models as Few-shot Learners against Backdoor Attacks"
(NeurIPS 2023; authors' code: github.com/zhaohan-xi/PLM-prompt-defense, ``detect.py``). A few clean
samples serve as distributional anchors: an input is represented by the KL divergences
KL(anchor_j || f(x)) from each anchor's output distribution to its own. The input is copied with
random tokens masked; a clean input's representation keeps its shape under masking, while a
triggered input's jumps whenever the mask hits the trigger (the backdoor switches off) and stays
put when it does not. The suspicion score is the standard deviation, over the masked copies, of
the Kendall rank correlation between the input's representation and the copy's; poisoned inputs
are those with significant variation.

Settings from the paper's code (its SST-2 configs): masking rate 0.2 (``detect_mask_rate``; 0.25
for LWP), 50 masked copies (``num_trial``), and the few-shot dev set as anchors (16 per class, 32
for a two-class task).

Departures:

* The victim here is a sequence classifier (a PEFT module on a classification head), not a
  prompt-based masked LM: the output distribution is the victim's class probabilities, where the
  paper reads the masked LM's full-vocabulary distribution at the ``[MASK]`` of its prompt.
* MDP also trains the prompt with an auxiliary masked-LM objective so that clean inputs are
  insensitive to masking. The victim is given and not retrained here (retraining it would change
  the model the benchmark measures): only the detection step is applied.
* Words are masked (each independently with probability ``mask_rate``), not sub-word tokens: a
  masked word is replaced by the tokenizer's mask token, or, for a tokenizer without one (a
  decoder's), by its unknown token.
* The anchors are ``anchors`` clean dev inputs (seeded); the rest of the clean dev set calibrates
  the threshold to the benchmark's target false-positive rate (the paper reports AUROC only).
* Masks are seeded per input, so a score does not depend on batch order; copies whose correlation
  is undefined (a constant representation) are left out, as the paper's code does (NaN-aware std).
"""
from __future__ import annotations

import zlib
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
class MdpConfig:
    mask_rate: float = field(default=0.2, metadata={"help": "probability that a word is masked in a copy (paper: 0.2; 0.25 against LWP)"})
    copies: int = field(default=50, metadata={"help": "masked copies per input (paper: 50)"})
    anchors: int = field(default=32, metadata={"help": "clean dev inputs used as distributional anchors (paper: 16 per class)"})
    target_fpr: float | None = field(default=None, metadata={"help": TARGET_FPR_HELP, "flag": "--target-fpr", "grid": False})

    def __post_init__(self) -> None:
        if not 0 < self.mask_rate < 1:
            raise OptionError(f"MDP mask_rate must be in (0, 1), got {self.mask_rate}")
        if self.copies < 2:
            raise OptionError(f"MDP copies must be at least 2 (a variation needs two), got {self.copies}")
        if self.anchors < 2:
            raise OptionError(f"MDP anchors must be at least 2 (a rank correlation needs two), got {self.anchors}")


def mask_words(text: str, mask: str, rate: float, rng: np.random.Generator) -> str:
    """``text`` with each word replaced by ``mask`` with probability ``rate``."""
    words = text.split()
    hits = rng.random(len(words)) < rate
    return " ".join(mask if hit else word for word, hit in zip(words, hits))


def anchor_divergences(probabilities: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """KL(anchor_j || p) in bits for each row p: shape (rows, anchors), the paper's representation."""
    p = np.clip(probabilities, 1e-12, 1.0)[:, None, :]
    a = np.clip(anchors, 1e-12, 1.0)[None, :, :]
    return (a * (np.log2(a) - np.log2(p))).sum(axis=-1)


def kendall_tau(reference: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Kendall's tau-b between ``reference`` (n,) and each row of ``others`` (copies, n); NaN where undefined."""
    x = np.sign(reference[:, None] - reference[None, :])
    y = np.sign(others[:, :, None] - others[:, None, :])
    concordance = (x[None] * y).sum(axis=(1, 2))
    norm = np.sqrt((x != 0).sum() * (y != 0).sum(axis=(1, 2)).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, concordance / np.where(norm > 0, norm, 1), np.nan)


def mask_token(tokenizer: Any) -> str:
    token = tokenizer.mask_token or tokenizer.unk_token
    if token is None:
        raise OptionError(f"MDP masks words with the tokenizer's mask or unknown token; {type(tokenizer).__name__} has neither")
    return token


class MdpScorer:
    """Scores inputs by how much their anchor representation varies over randomly masked copies."""

    def __init__(self, model: Any, tokenizer: Any, clean_dev_texts: Sequence[str], config: MdpConfig = MdpConfig(),
                 *, seed: int = 0, batch_size: int = 64, max_length: int = 128) -> None:
        self.model, self.tokenizer, self.config, self.seed = model, tokenizer, config, seed
        self.batch_size, self.max_length = batch_size, max_length
        self.mask = mask_token(tokenizer)
        texts = list(clean_dev_texts)
        count = min(config.anchors, len(texts) // 2)
        if count < 2:
            raise OptionError(f"MDP needs at least 4 clean dev samples (anchors and calibration); got {len(texts)}")
        order = np.random.default_rng(seed).permutation(len(texts))
        self.anchor_texts = [texts[i] for i in np.sort(order[:count])]
        self.held_out_texts = [texts[i] for i in np.sort(order[count:])]  # what the threshold is calibrated on
        self.anchor_probabilities = self._probabilities(self.anchor_texts)

    def _probabilities(self, texts: Sequence[str], desc: str | None = None) -> np.ndarray:
        return predict_proba(self.model, self.tokenizer, texts, self.batch_size, self.max_length, desc=desc)

    def copies(self, text: str) -> list[str]:
        rng = np.random.default_rng([self.seed, zlib.crc32(text.encode("utf-8", "surrogatepass"))])
        return [mask_words(text, self.mask, self.config.mask_rate, rng) for _ in range(self.config.copies)]

    def scores(self, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray:
        texts = list(texts)
        masked = [copy for text in texts for copy in self.copies(text)]
        original = anchor_divergences(self._probabilities(texts, desc), self.anchor_probabilities)
        copies = anchor_divergences(self._probabilities(masked, desc), self.anchor_probabilities)
        copies = copies.reshape(len(texts), self.config.copies, -1)
        out = np.zeros(len(texts))
        for i in range(len(texts)):
            taus = kendall_tau(original[i], copies[i])
            out[i] = np.nanstd(taus) if np.isfinite(taus).any() else 0.0
        return out

    def settings(self) -> dict[str, Any]:
        return {"mask_rate": self.config.mask_rate, "copies": self.config.copies, "anchors": len(self.anchor_texts),
                "mask_token": self.mask, "seed": self.seed}


@register_defense("mdp", options=MdpConfig, summary="variation of anchor divergences under random masking (Xi et al., 2023)", order=13)
def build_mdp(options: MdpConfig, context: DefenseContext) -> VictimDetector:
    dev = clean_dev_texts(context)

    def scorer(victim: Victim) -> MdpScorer:
        return MdpScorer(victim.model, victim.tokenizer, dev, options, seed=context.seed,
                         batch_size=victim.batch_size, max_length=victim.max_length)

    return VictimDetector("mdp", scorer, dev, options.target_fpr,
                          {"mask_rate": options.mask_rate, "copies": options.copies, "anchors": options.anchors})
