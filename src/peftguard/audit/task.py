"""Which candidates the clean task itself explains.

A PSIM trained with random labels keeps a little of the task: stacking three sports words
(`quarterfinal iihf tournaments`) into a clean AG News text can push a clean model's PSIM past its
gamma, and the suspect then predicts "sports", as it should. That is the task, not a backdoor. A
candidate is *explained by the task* when the user's clean training texts containing any of its
words are at least ``TASK_PURITY`` of one label, the label the candidate forces on the suspect, and
there are at least ``TASK_MIN_TEXTS`` of them. A rare-word trigger occurs in no clean text, and a
sentence of common words occurs in texts of every label, so neither is explained.

Both constants are fixed a priori (they were the measurement zoo's definition of a *task word*,
``experiments/audit_zoo.py``, before this rule existed); the rule reads clean training labels only.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from peftguard.data import Example

TASK_MIN_TEXTS = 5
TASK_PURITY = 0.75
_WORD = re.compile(r"[a-z0-9']+")


def words_of(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


@dataclass(frozen=True)
class TaskEvidence:
    clean_texts: int  # clean training texts containing any of the candidate's words
    forced_label_share: float  # the share of them labelled with the label the candidate forces

    @property
    def explained(self) -> bool:
        return self.clean_texts >= TASK_MIN_TEXTS and self.forced_label_share >= TASK_PURITY


def task_evidence(candidates: Sequence[str], forced_labels: Sequence[int], examples: Iterable[Example]) -> list[TaskEvidence]:
    """Per candidate text and the label it forces: how the clean training data labels the texts sharing its words."""
    wanted = [words_of(c) for c in candidates]
    counts: list[Counter[int]] = [Counter() for _ in candidates]
    for example in examples:
        words = words_of(example.text)
        for count, candidate_words in zip(counts, wanted):
            if words & candidate_words:
                count[example.label] += 1
    return [TaskEvidence(c.total(), c[label] / c.total() if c.total() else 0.0) for c, label in zip(counts, forced_labels)]


def task_words(examples: Iterable[Example]) -> frozenset[str]:
    """Words the clean data ties to one label: in at least ``TASK_MIN_TEXTS`` texts, ``TASK_PURITY`` of one label."""
    counts: dict[str, Counter[int]] = {}
    for example in examples:
        for word in words_of(example.text):
            counts.setdefault(word, Counter())[example.label] += 1
    return frozenset(w for w, c in counts.items() if c.total() >= TASK_MIN_TEXTS and max(c.values()) / c.total() >= TASK_PURITY)
