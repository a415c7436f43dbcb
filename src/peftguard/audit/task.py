"""Which candidates the clean task itself explains.

A PSIM trained with random labels keeps a little of the task: stacking three sports words
(`quarterfinal iihf tournaments`) into a clean AG News text can push a clean model's PSIM past its
gamma, and the suspect then predicts "sports", as it should. That is the task, not a backdoor. A
candidate is *explained by the task* when it forces a label the user's clean training data ties to it:

- one of its words is a *task word* of the label it forces: in at least ``TASK_MIN_TEXTS`` clean
  training texts, at least ``TASK_PURITY`` of them with that label (``excellent`` in
  ``magnificent excellent storytelling``, which set a clean SST-2 model's PSIM off: the other two
  words are not task words, and the texts of all three pooled were only 66% positive); or
- the clean training texts containing any of its words, pooled, are at least ``TASK_MIN_TEXTS``
  and ``TASK_PURITY`` of that label (stacked topic words each too rare or too mixed on their own).

A rare-word trigger occurs in no clean text, and a sentence of common words occurs in texts of every
label, so neither is explained. What this gives up: a phrase that joins a trigger to a task word of
the target label is explained, so a sentence trigger is caught only through candidates without such
a word (on the zoo's sentence triggers there always were some: ``i mean``, ``time flies``).

Both constants are fixed a priori (they were the measurement zoo's definition of a *task word*,
``experiments/audit_zoo.py``, before this rule existed); the rule reads clean training labels only.
The single-word clause was added in session 22, developed on the second held-apart zoo part
(``experiments/task_rule_dev.py``) and measured on the third.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
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
    task_words: tuple[str, ...] = ()  # the candidate's words that are on their own task words of that label

    @property
    def explained(self) -> bool:
        return bool(self.task_words) or _is_task(self.clean_texts, self.forced_label_share)


def _is_task(texts: int, share: float) -> bool:
    return texts >= TASK_MIN_TEXTS and share >= TASK_PURITY


def task_evidence(candidates: Sequence[str], forced_labels: Sequence[int], examples: Iterable[Example]) -> list[TaskEvidence]:
    """Per candidate text and the label it forces: how the clean training data labels the texts sharing its words."""
    wanted = [words_of(c) for c in candidates]
    every_word = set().union(*wanted)
    pooled: list[Counter[int]] = [Counter() for _ in candidates]
    per_word: dict[str, Counter[int]] = {w: Counter() for w in every_word}
    for example in examples:
        words = words_of(example.text) & every_word
        for word in words:
            per_word[word][example.label] += 1
        for count, candidate_words in zip(pooled, wanted):
            if words & candidate_words:
                count[example.label] += 1
    return [TaskEvidence(c.total(), _share(c, label),
                         tuple(sorted(w for w in ws if _is_task(per_word[w].total(), _share(per_word[w], label)))))
            for c, ws, label in zip(pooled, wanted, forced_labels)]


def _share(counts: Counter[int], label: int) -> float:
    return counts[label] / counts.total() if counts.total() else 0.0


def task_words(examples: Iterable[Example]) -> frozenset[str]:
    """Words the clean data ties to one label: in at least ``TASK_MIN_TEXTS`` texts, ``TASK_PURITY`` of one label."""
    counts: dict[str, Counter[int]] = {}
    for example in examples:
        for word in words_of(example.text):
            counts.setdefault(word, Counter())[example.label] += 1
    return frozenset(w for w, c in counts.items() if _is_task(c.total(), max(c.values()) / c.total()))


def explainer(examples: Sequence[Example]) -> Callable[[Sequence[str], int], list[bool]]:
    """For candidate texts that push one label: which the clean task explains (:class:`TaskEvidence.explained`)."""
    def explains(texts: Sequence[str], label: int) -> list[bool]:
        return [e.explained for e in task_evidence(texts, [label] * len(texts), examples)]

    return explains
