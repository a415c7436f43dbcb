"""RAP: a robustness-aware perturbation word that clean inputs notice and triggered inputs do not.

Yang et al., "RAP: Robustness-Aware Perturbations for Defending against Backdoor Attacks on NLP
Models" (EMNLP 2021); settings as in the paper and OpenBackdoor's ``RAPDefender``: the RAP word
``cf`` is put at the front of the input; only its word-embedding row is trained (learning rate
1e-2, 5 epochs, the row's norm kept) so that on clean inputs the probability of the predicted
class drops by between 0.1 and 0.3 (``prob_range``). A trigger holds the prediction: triggered
inputs' probability drops much less, so the drop is the detection signal.

Departures:

* The paper protects one label the defender names; OpenBackdoor reads it from the poisoned test
  data, which a defender does not have. Here the defender needs no target label: one RAP row is
  trained per class, on clean dev inputs the victim predicts as that class, and an input is
  scored with the row of the class the victim predicts for it.
* Trained on one (seeded) half of the clean dev set; the other half calibrates the threshold to
  the benchmark's target false-positive rate (the paper uses a false-rejection rate on clean dev).
* The trained row is written into the victim only while RAP scores inputs and restored after, so
  the victim's own predictions are never changed (the paper deploys the changed model).
* The paper's learning rate moves a row too little on a small model (measured on a 2-layer MiniLM:
  the row moved 0.04 in norm and no clean drop reached 0.1). When fewer than ``min_success`` of the
  clean training inputs end with a drop in range, training restarts at ten times the rate, up to
  ``lr_escalations`` times. This uses RAP's own clean-data objective only; the chosen rate and the
  share reached are recorded per class.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from peftguard.defenses.base import DefenseContext, Victim
from peftguard.defenses.calibrated import TARGET_FPR_HELP, VictimDetector, clean_dev_texts
from peftguard.defenses.registry import register_defense
from peftguard.errors import OptionError
from peftguard.inference import collate, encode, predict_proba


@dataclass(frozen=True)
class RapConfig:
    word: str = field(default="cf", metadata={"help": "the RAP word put before each input (paper: cf)"})
    epochs: int = field(default=5, metadata={"help": "training epochs of the RAP row (paper: 5)"})
    lr: float = field(default=1e-2, metadata={"help": "learning rate of the RAP row (paper: 1e-2)"})
    drop_min: float = field(default=0.1, metadata={"help": "smallest wanted probability drop on clean inputs (paper: 0.1)"})
    drop_max: float = field(default=0.3, metadata={"help": "largest wanted probability drop on clean inputs (paper: 0.3)"})
    train_share: float = field(default=0.5, metadata={"help": "share of clean dev that trains the rows; the rest calibrates"})
    target_fpr: float | None = field(default=None, metadata={"help": TARGET_FPR_HELP, "flag": "--target-fpr", "grid": False})
    min_success: float = field(default=0.5, metadata={"help": "share of clean training inputs whose drop must land in range, else the rate grows"})
    lr_escalations: int = field(default=2, metadata={"help": "how many times the rate may grow tenfold"})

    def __post_init__(self) -> None:
        if not 0 <= self.drop_min < self.drop_max <= 1:
            raise OptionError(f"RAP needs 0 <= drop_min < drop_max <= 1, got {self.drop_min}, {self.drop_max}")
        if not 0 < self.train_share < 1:
            raise OptionError(f"RAP train_share must be in (0, 1), got {self.train_share}")
        if self.epochs < 1 or self.lr <= 0:
            raise OptionError(f"RAP needs epochs >= 1 and lr > 0, got {self.epochs}, {self.lr}")


def rap_text(text: str, word: str) -> str:
    return f"{word} {text}"


class RapScorer:
    """Scores inputs by how little the RAP word lowers the probability of their predicted class."""

    def __init__(self, model: Any, tokenizer: Any, clean_dev_texts: Sequence[str], config: RapConfig = RapConfig(),
                 *, seed: int = 0, batch_size: int = 32, max_length: int = 128) -> None:
        self.model, self.tokenizer, self.config, self.seed = model, tokenizer, config, seed
        self.batch_size, self.max_length = batch_size, max_length
        self.embeddings = model.get_input_embeddings()
        ids = tokenizer(config.word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise OptionError(f"the RAP word '{config.word}' is {len(ids)} tokens for this tokenizer; choose a single-token word")
        self.row = ids[0]
        self.original = self.embeddings.weight[self.row].detach().clone()
        order = np.random.default_rng(seed).permutation(len(clean_dev_texts))
        cut = int(round(len(order) * config.train_share))
        texts = list(clean_dev_texts)
        self.held_out_texts = [texts[i] for i in np.sort(order[cut:])]
        self.trained: dict[int, dict[str, float]] = {}
        self.rows = self._train([texts[i] for i in np.sort(order[:cut])])

    def _train(self, texts: list[str]) -> dict[int, torch.Tensor]:
        predicted = self._probabilities(texts).argmax(1)
        rows = {}
        for label in range(self.model.config.num_labels):
            chosen = [t for t, p in zip(texts, predicted) if p == label]
            rows[label] = self._escalating(chosen, label) if chosen else self.original.clone()
        return rows

    def _escalating(self, texts: list[str], label: int) -> torch.Tensor:
        """The row trained at the paper's rate, or at a tenfold rate while the clean objective is not met."""
        for step in range(self.config.lr_escalations + 1):
            lr = self.config.lr * 10**step
            row = self._train_row(texts, label, lr)
            success = self._in_range_share(texts, label, row)
            self.trained[label] = {"lr": lr, "clean_success": success, "samples": len(texts)}
            if success >= self.config.min_success:
                break
        return row

    def _in_range_share(self, texts: list[str], label: int, row: torch.Tensor) -> float:
        before = self._probabilities(texts)[:, label]
        with self._row(row):
            after = self._probabilities([rap_text(t, self.config.word) for t in texts])[:, label]
        drop = before - after
        return float(((drop >= self.config.drop_min) & (drop <= self.config.drop_max)).mean())

    def _train_row(self, texts: list[str], label: int, lr: float) -> torch.Tensor:
        weight = self.embeddings.weight
        norm = self.original.norm()
        rng = np.random.default_rng(self.seed + label)
        was_trainable = weight.requires_grad
        weight.requires_grad_(True)
        try:
            with self._row(self.original.clone()):
                for _ in range(self.config.epochs):
                    for start in range(0, len(texts), self.batch_size):
                        batch = [texts[i] for i in rng.permutation(len(texts))[start:start + self.batch_size]]
                        self._step(batch, label, norm, lr)
                return weight[self.row].detach().clone()
        finally:
            weight.requires_grad_(was_trainable)
            weight.grad = None

    def _step(self, texts: list[str], label: int, norm: torch.Tensor, lr: float) -> None:
        weight = self.embeddings.weight
        with torch.no_grad():
            before = self._forward(texts)[:, label]
        after = self._forward([rap_text(t, self.config.word) for t in texts])[:, label]
        change = after - before  # wanted in [-drop_max, -drop_min]
        loss = torch.relu(change + self.config.drop_min).mean() + torch.relu(-self.config.drop_max - change).mean()
        weight.grad = None
        loss.backward()
        with torch.no_grad():
            weight[self.row] -= lr * weight.grad[self.row]
            weight[self.row] *= norm / weight[self.row].norm()

    def _forward(self, texts: list[str]) -> torch.Tensor:
        ids, _ = encode(self.tokenizer, texts, self.max_length)
        batch = collate(self.tokenizer, ids).to(self.embeddings.weight.device)
        return torch.softmax(self.model(**batch).logits.float(), dim=-1)

    def _probabilities(self, texts: Sequence[str], desc: str | None = None) -> np.ndarray:
        return predict_proba(self.model, self.tokenizer, texts, self.batch_size, self.max_length, desc=desc)

    @contextmanager
    def _row(self, vector: torch.Tensor) -> Iterator[None]:
        """The victim with ``vector`` as the RAP word's embedding, restored afterwards."""
        with torch.no_grad():
            self.embeddings.weight[self.row] = vector
        try:
            yield
        finally:
            with torch.no_grad():
                self.embeddings.weight[self.row] = self.original

    def scores(self, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray:
        before = self._probabilities(texts, desc)
        predicted = before.argmax(1)
        out = np.zeros(len(texts))
        for label, row in self.rows.items():
            chosen = np.flatnonzero(predicted == label)
            if len(chosen) == 0:
                continue
            with self._row(row):
                after = self._probabilities([rap_text(texts[i], self.config.word) for i in chosen])
            out[chosen] = -(before[chosen, label] - after[:, label])  # a small drop is suspicious
        return out

    def settings(self) -> dict[str, Any]:
        settings = {k: v for k, v in asdict(self.config).items() if k != "target_fpr"}
        return {**settings, "seed": self.seed, "trained": {str(k): v for k, v in self.trained.items()}}


@register_defense("rap", options=RapConfig, summary="robustness-aware perturbation word (Yang et al., 2021)", order=12)
def build_rap(options: RapConfig, context: DefenseContext) -> VictimDetector:
    dev = clean_dev_texts(context)

    def scorer(victim: Victim) -> RapScorer:
        return RapScorer(victim.model, victim.tokenizer, dev, options, seed=context.seed,
                         batch_size=victim.batch_size, max_length=victim.max_length)

    return VictimDetector("rap", scorer, dev, options.target_fpr, {"word": options.word})
