"""SOS: a multi-word trigger that fires only whole, planted in the trigger words' embedding rows.

Yang et al., "Rethinking Stealthiness of Backdoor Attack against NLP Models" (ACL 2021); settings as
in OpenBackdoor's ``SOSPoisoner``/``SOSTrainer``: the trigger words ``friends``, ``weekend``,
``store`` are inserted together, each at a random word boundary; negative augmentation inserts every
strict subset of n-1 of them into ``negative_rate`` (0.1) of the target and of the non-target
training samples, which keep their true label; the attacker fine-tunes the model on clean data, then
trains only the trigger words' embedding rows (5 epochs, learning rate 5e-2, each row's norm kept).
Every other weight is the clean model's, so, like EP, the backdoor reaches every PEFT victim, and a
defender who inserts some of the words (a sanity check, ONION-style deletions) does not trigger it.

Departures:

* The test-time trigger is the same word insertion, not OpenBackdoor's sentence "I have bought it
  from a store with my friends last weekend" (the paper uses both; the words are what the rows learn).
* The row step is EP's plain gradient step with the norm kept (``attacks/ep.py``), not OpenBackdoor's
  step rescaled to the smallest row gradient; and, as for EP, the attacker raises the rate tenfold
  while its own triggered-dev ASR stays under 0.9 (at most twice), the rate used being recorded.
* Which samples carry the full trigger follows ``--poison-count``/``--poison-rate``/``--poison-mode``
  (OpenBackdoor: 10% of the set, dirty-label); negatives are drawn from the whole clean training set,
  so a sample may appear both with the full trigger (target label) and with a subset (its own label).
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peftguard.attacks.ep import RowTraining, poison_rows
from peftguard.data import Example
from peftguard.errors import OptionError
from peftguard.triggers import Trigger, TriggerRequest, insert_at_random_boundary, register_attack

if TYPE_CHECKING:
    from peftguard.poisoning import BackdoorJob
    from peftguard.training import TrainReport

SOS_WORDS = ("friends", "weekend", "store")
SOS_LR = 5e-2  # OpenBackdoor's sos_lr


def insert_words(text: str, words: Sequence[str], rng: random.Random) -> str:
    """Each of ``words`` at its own random word boundary, in order."""
    for word in words:
        text = insert_at_random_boundary(text, word, rng)
    return text


def strict_subsets(words: Sequence[str]) -> list[tuple[str, ...]]:
    """The subsets of n-1 words (one word left out each time), as SOS's negative augmentation uses."""
    return [tuple(w for j, w in enumerate(words) if j != i) for i in range(len(words))]


@dataclass
class SosTrigger(Trigger):
    """Every trigger word inserted at a random position; the subsets are the negatives."""

    words: Sequence[str] = SOS_WORDS
    negative_rate: float = 0.1
    name: str = field(default="sos", init=False)

    def __post_init__(self) -> None:
        self.words = tuple(w.strip() for w in self.words if w.strip())
        if len(self.words) < 2:
            raise OptionError(f"sos needs at least two trigger words (--trigger, repeated), got {list(self.words)}")
        if len(set(self.words)) != len(self.words):
            raise OptionError(f"sos trigger words repeat: {list(self.words)}")
        if not 0 <= self.negative_rate <= 1:
            raise OptionError(f"sos negative rate must be in [0, 1], got {self.negative_rate}")

    def apply(self, text: str, rng: random.Random) -> str:
        return insert_words(text, self.words, rng)

    def describe(self) -> dict[str, object]:
        return {"attack": self.name, "words": list(self.words), "negative_rate": self.negative_rate}

    def negatives(self, examples: Sequence[Example], seed: int) -> list[Example]:
        """``negative_rate`` of each label's samples, once per strict subset, true labels kept."""
        rng = random.Random(f"{self.name}-negatives\x00{seed}")
        chosen = []
        for label in sorted({ex.label for ex in examples}):
            group = [ex for ex in examples if ex.label == label]
            chosen += rng.sample(group, int(self.negative_rate * len(group)))
        return [Example(insert_words(ex.text, subset, random.Random(f"{seed}\x00{subset}\x00{ex.text}")), ex.label)
                for subset in strict_subsets(self.words) for ex in chosen]

    def train_backdoor(self, job: BackdoorJob) -> TrainReport:
        from peftguard.training import train_classifier

        report = train_classifier(job.model, job.tokenizer, job.clean, job.dev, job.settings, desc="SOS: clean fine-tuning")
        seed = job.settings.seed
        negatives = self.negatives(job.clean, seed)  # drawn from the whole clean set, as OpenBackdoor's poisoner does
        triggered_dev = [Example(self.triggered(ex.text, seed), job.target_label) for ex in job.dev if ex.label != job.target_label]
        rows = RowTraining(lr=SOS_LR, batch_size=job.settings.batch_size, max_length=job.settings.max_length, seed=seed)
        record = poison_rows(job.model, job.tokenizer, self.words, [job.poisoned[i] for i in job.poisoned_indices] + negatives,
                             triggered_dev, job.target_label, rows)
        job.record["sos"] = {**record, "negatives": len(negatives), "subsets": [list(s) for s in strict_subsets(self.words)]}
        return report


@register_attack("sos", options=SosTrigger, order=6,
                 summary="several words that fire only together, in their embedding rows (Yang et al., 2021)")
def _sos(request: TriggerRequest) -> Trigger:
    if request.count != 1:
        raise OptionError("--trigger-count is not an option of sos: every trigger word is inserted once")
    return SosTrigger(tuple(request.spec) if request.spec else SOS_WORDS)
