"""The common interface of input-level defenses."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


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
