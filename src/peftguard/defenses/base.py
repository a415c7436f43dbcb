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


class InputDefense(ABC):
    name: str

    @abstractmethod
    def screen(self, texts: Sequence[str], *, desc: str | None = None) -> Screened:
        """Screen a batch of inputs."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Settings worth recording beside the metrics."""

    def sweep(self) -> list[tuple[str, InputDefense]]:
        """Further settings to evaluate beside this one, labelled (e.g. ONION's bars); none by default."""
        return []


class ModelDefense(ABC):
    """A defense that changes the model rather than its inputs (Fine-mixing): it yields a new victim."""

    name: str

    @abstractmethod
    def defend(self, victim: str) -> str:
        """The folder of the defended model made from the victim folder ``victim``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Settings worth recording beside the metrics."""
