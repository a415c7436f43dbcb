"""The common interfaces of defenses: input-level (screen or rewrite inputs) and model-level."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from peftguard.data import TextDataset
from peftguard.models import LoadOptions
from peftguard.triggers import Trigger


@dataclass(frozen=True)
class DefenseContext:
    """What a defense may need to know about the evaluation it is built for."""

    dataset: TextDataset
    triggers: Sequence[Trigger] = ()
    target_label: int = 0
    seed: int = 0
    max_eval_samples: int | None = None
    options: LoadOptions = LoadOptions()


@dataclass
class Screened:
    """What a defense hands on to the victim.

    ``texts`` are what the victim classifies (rewritten or not); ``flagged`` marks samples the
    defense withholds as poisoned; ``scores`` are its suspicion scores (higher = more suspicious).
    """

    texts: list[str]
    flagged: np.ndarray | None = None
    scores: np.ndarray | None = None


@dataclass(frozen=True)
class Victim:
    """The model an evaluation measures, for a defense that reads its predictions.

    ``reference`` says which victim it is (folder and on-disk state): defenses bound to it are
    cached under it, so a bound defense is never reused for another victim.
    """

    model: Any
    tokenizer: Any
    reference: tuple
    batch_size: int = 64
    max_length: int = 128

    def predict_proba(self, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray:
        """The victim's class probabilities for ``texts`` (rows in input order)."""
        from peftguard.inference import predict_proba

        return predict_proba(self.model, self.tokenizer, list(texts), self.batch_size, self.max_length, desc=desc)


class InputDefense(ABC):
    name: str
    needs_victim: bool = False  # True: evaluate through bind(victim), which reads the victim's predictions

    @abstractmethod
    def screen(self, texts: Sequence[str], *, desc: str | None = None) -> Screened:
        """Screen a batch of inputs."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Settings worth recording beside the metrics."""

    def sweep(self) -> list[tuple[str, InputDefense]]:
        """Further settings to evaluate beside this one, labelled (e.g. ONION's bars); none by default."""
        return []

    def bind(self, victim: Victim) -> InputDefense:
        """This defense in front of ``victim``. A defense that needs the victim's predictions (STRIP,
        RAP, BKI) sets ``needs_victim`` and returns a new defense holding it; others need not override."""
        return self

    def reported(self) -> dict[str, Any]:
        """Top-level ``metrics.json`` fields this defense adds (PSIM: the gamma it flagged with)."""
        return {}


class ModelDefense(ABC):
    """A defense that changes the model rather than its inputs (Fine-mixing): it yields a new victim."""

    name: str

    @abstractmethod
    def defend(self, victim: str) -> str:
        """The folder of the defended model made from the victim folder ``victim``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Settings worth recording beside the metrics."""
