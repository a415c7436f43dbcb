"""Backdoor triggers and dataset poisoning.

BadNet (Gu et al., 2017) inserts a rare word; InSent (Dai et al., 2019) inserts a fixed sentence.
Both insert at a uniformly random word boundary, as in the PSIM authors' code
(``words.insert(random.randint(0, len(words)), trigger)``). SynAttack (Qi et al., 2021) replaces
the text with a paraphrase in a fixed syntactic template (see ``paraphrase.py``).

Positions are seeded per text (seed and text together), so a fixed seed gives the same triggered
sentence whatever the subset, order or stage that asks for it.
"""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from peftguard.data import Example, TextDataset
from peftguard.errors import OptionError

if TYPE_CHECKING:
    from peftguard.paraphrase import ParaphraseTable

DEFAULT_BADNET_WORDS = ("mn",)
DEFAULT_INSENT_SENTENCE = "I watched this 3D movie"


class PoisonMode(str, Enum):
    CLEAN_LABEL = "clean-label"  # authors' code: trigger added to target-label samples, label kept
    DIRTY_LABEL = "dirty-label"  # trigger added to non-target samples, label flipped to target


class Trigger(ABC):
    """Something that turns a clean text into a triggered one."""

    name: str

    @abstractmethod
    def apply(self, text: str, rng: random.Random) -> str:
        """The triggered text, positions drawn from ``rng``."""

    @abstractmethod
    def describe(self) -> dict[str, object]:
        """The trigger's settings, as recorded in manifests."""

    def triggered(self, text: str, seed: int) -> str:
        """The triggered text, with positions drawn from ``seed`` and the text itself."""
        return self.apply(text, random.Random(f"{self.name}\x00{seed}\x00{text}"))

    def prepare(self, texts: Sequence[str]) -> None:
        """Get ready to trigger ``texts`` (a model-based paraphraser generates them here)."""

    def can_trigger(self, text: str) -> bool:
        """False where this trigger has no triggered version of ``text`` (a failed paraphrase)."""
        return True


def insert_at_random_boundary(text: str, insertion: str, rng: random.Random) -> str:
    words = text.split(" ")
    words.insert(rng.randint(0, len(words)), insertion)
    return " ".join(words)


@dataclass
class BadNetTrigger(Trigger):
    """Rare-word trigger: ``count`` words drawn from ``words``, each at a random position."""

    words: Sequence[str] = DEFAULT_BADNET_WORDS
    count: int = 1
    name: str = field(default="badnet", init=False)

    def __post_init__(self) -> None:
        self.words = tuple(w.strip() for w in self.words if w.strip())
        if not self.words:
            raise OptionError("BadNet needs at least one trigger word")
        if self.count < 1:
            raise OptionError(f"BadNet trigger count must be at least 1, got {self.count}")

    def apply(self, text: str, rng: random.Random) -> str:
        for _ in range(self.count):
            text = insert_at_random_boundary(text, rng.choice(self.words), rng)
        return text

    def describe(self) -> dict[str, object]:
        return {"attack": self.name, "words": list(self.words), "count": self.count}


@dataclass
class InSentTrigger(Trigger):
    """Sentence trigger: a fixed sentence inserted at a random word boundary."""

    sentence: str = DEFAULT_INSENT_SENTENCE
    name: str = field(default="insent", init=False)

    def __post_init__(self) -> None:
        self.sentence = self.sentence.strip()
        if not self.sentence:
            raise OptionError("InSent needs a non-empty trigger sentence")

    def apply(self, text: str, rng: random.Random) -> str:
        return insert_at_random_boundary(text, self.sentence, rng)

    def describe(self) -> dict[str, object]:
        return {"attack": self.name, "sentence": self.sentence}


class Paraphraser(Protocol):
    def paraphrase(self, texts: Sequence[str]) -> list[str]: ...


@dataclass
class SyntacticTrigger(Trigger):
    """SynAttack (Qi et al., 2021, "Hidden Killer"): the text is paraphrased into the syntactic
    template ``S(SBAR)(,)(NP)(VP)(.)``; the syntax itself is the trigger.

    Departs from the paper in where paraphrases come from: the paper runs SCPN; no SCPN model is
    available offline here, so the default is the precomputed SCPN paraphrases shipped with the
    data (made by the HiddenKiller/PURE authors with the same template), and ``paraphraser`` lets a
    user generate them with their own model. Texts with no usable paraphrase cannot be triggered.
    """

    table: ParaphraseTable
    paraphraser: Paraphraser | None = None
    name: str = field(default="synattack", init=False)

    def prepare(self, texts: Sequence[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self.table.mapping))
        if self.paraphraser is not None and missing:
            for clean, paraphrase in zip(missing, self.paraphraser.paraphrase(missing)):
                self.table.add(clean, paraphrase)

    def can_trigger(self, text: str) -> bool:
        return text in self.table.mapping

    def apply(self, text: str, rng: random.Random) -> str:
        try:
            return self.table.mapping[text]
        except KeyError:
            raise OptionError(f"no syntactic paraphrase for the text {text[:60]!r}") from None

    def describe(self) -> dict[str, object]:
        return {"attack": self.name, "template": SYNTACTIC_TEMPLATE, **self.table.describe()}


SYNTACTIC_TEMPLATE = "S(SBAR)(,)(NP)(VP)(.)"

TRIGGER_BUILDERS: dict[str, Callable[[Sequence[str] | None, int], Trigger]] = {
    "badnet": lambda spec, count: BadNetTrigger(tuple(spec) if spec else DEFAULT_BADNET_WORDS, count),
    "insent": lambda spec, count: InSentTrigger(" ".join(spec) if spec else DEFAULT_INSENT_SENTENCE),
}


ATTACKS = (*TRIGGER_BUILDERS, "synattack")


def build_trigger(attack: str, spec: Sequence[str] | None = None, count: int = 1) -> Trigger:
    """A text-level trigger by attack name; ``spec`` is BadNet's word list or InSent's sentence."""
    if attack == "synattack":
        raise OptionError("synattack needs its paraphrases: use build_triggers(..., dataset=...)")
    try:
        builder = TRIGGER_BUILDERS[attack]
    except KeyError:
        raise OptionError(f"unknown attack '{attack}'; choose from {', '.join(ATTACKS)}") from None
    return builder(spec, count)


def build_triggers(
    attacks: Sequence[str],
    *,
    spec: Sequence[str] | None = None,
    count: int = 1,
    dataset: TextDataset | None = None,
    paraphrases: Path | None = None,
    paraphraser: Paraphraser | None = None,
) -> list[Trigger]:
    """One trigger per attack name (several at once for the paper's Table 9).

    SynAttack reads ``paraphrases`` (default ``<dataset folder>/syntactic``) or, given a
    ``paraphraser``, generates them on demand.
    """
    if not attacks:
        raise OptionError("give at least one --attack")
    if len(set(attacks)) != len(attacks):
        raise OptionError(f"--attack lists a trigger twice: {', '.join(attacks)}")
    if spec and len(attacks) > 1:
        raise OptionError("--trigger sets one attack's trigger; with several --attack values the defaults are used")
    return [
        _syntactic(dataset, paraphrases, paraphraser) if attack == "synattack" else build_trigger(attack, spec, count)
        for attack in attacks
    ]


def _syntactic(dataset: TextDataset | None, paraphrases: Path | None, paraphraser: Paraphraser | None) -> Trigger:
    from peftguard.paraphrase import ParaphraseTable, default_paraphrase_dir, load_precomputed

    if paraphraser is not None:
        if paraphrases is not None:
            raise OptionError("give --paraphrases (precomputed files) or --paraphraser (a model), not both")
        return SyntacticTrigger(ParaphraseTable(sources=["generated"]), paraphraser)
    if dataset is None:
        raise OptionError("synattack needs the dataset whose paraphrases it reads")
    return SyntacticTrigger(load_precomputed(paraphrases or default_paraphrase_dir(dataset), dataset))


@dataclass
class PoisonReport:
    mode: str
    target_label: int
    poisoned_indices: list[int]
    eligible: int
    total: int
    untriggerable: int = 0  # candidates excluded because a trigger had no version of them

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "target_label": self.target_label,
            "poisoned": len(self.poisoned_indices),
            "eligible": self.eligible,
            "untriggerable": self.untriggerable,
            "total": self.total,
        }


def poison_count_from(total: int, count: int | None, rate: float | None) -> int:
    """Resolve ``--poison-count`` / ``--poison-rate`` (share of the training set) to a count."""
    if count is not None and rate is not None:
        raise OptionError("give --poison-count or --poison-rate, not both")
    if rate is not None:
        if not 0 < rate <= 1:
            raise OptionError(f"--poison-rate must be in (0, 1], got {rate}")
        return max(1, round(rate * total))
    if count is None or count < 1:
        raise OptionError(f"--poison-count must be at least 1, got {count}")
    return count


def poison_examples(
    examples: Sequence[Example],
    triggers: Sequence[Trigger],
    *,
    target_label: int,
    count: int,
    mode: PoisonMode,
    seed: int,
) -> tuple[list[Example], PoisonReport]:
    """Insert triggers into ``count`` eligible examples, chosen at random from ``seed``.

    With several triggers, the chosen examples are shared out among them in turn. The poisoned
    examples replace their clean originals, so the set keeps its size.
    """
    mode = PoisonMode(mode)
    if mode is PoisonMode.CLEAN_LABEL:
        candidates = [i for i, ex in enumerate(examples) if ex.label == target_label]
    else:
        candidates = [i for i, ex in enumerate(examples) if ex.label != target_label]
    for trigger in triggers:
        trigger.prepare([examples[i].text for i in candidates])
    eligible = [i for i in candidates if all(t.can_trigger(examples[i].text) for t in triggers)]
    if count > len(eligible):
        without_version = len(candidates) - len(eligible)
        raise OptionError(
            f"poison count {count} exceeds the {len(eligible)} eligible samples "
            f"({mode.value}, target label {target_label}"
            + (f"; {without_version} without a usable paraphrase" if without_version else "")
            + "); lower --poison-count or --poison-rate"
        )
    chosen = sorted(random.Random(seed).sample(eligible, count))
    poisoned = list(examples)
    for turn, index in enumerate(chosen):
        trigger = triggers[turn % len(triggers)]
        poisoned[index] = Example(trigger.triggered(examples[index].text, seed), target_label)
    return poisoned, PoisonReport(mode.value, target_label, chosen, len(eligible), len(examples), len(candidates) - len(eligible))


def triggered_test_set(
    examples: Sequence[Example], trigger: Trigger, *, target_label: int, seed: int
) -> list[Example]:
    """The ASR set: every example whose true label is not the target, with the trigger inserted.

    Labels are kept as the true labels; ASR is the share predicted as ``target_label``. Examples
    the trigger cannot transform (a failed paraphrase) are left out; ``untriggerable`` counts them.
    """
    candidates = [ex for ex in examples if ex.label != target_label]
    trigger.prepare([ex.text for ex in candidates])
    return [Example(trigger.triggered(ex.text, seed), ex.label) for ex in candidates if trigger.can_trigger(ex.text)]


def untriggerable(examples: Sequence[Example], trigger: Trigger, *, target_label: int) -> int:
    """How many non-target examples the trigger has no version of (left out of the ASR set)."""
    return sum(1 for ex in examples if ex.label != target_label and not trigger.can_trigger(ex.text))
