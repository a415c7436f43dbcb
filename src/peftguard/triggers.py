"""Backdoor triggers and the triggered test sets (dataset poisoning is in ``poisoning.py``).

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
from peftguard.registries import Registry

if TYPE_CHECKING:
    from peftguard.paraphrase import ParaphraseTable
    from peftguard.poisoning import BackdoorJob
    from peftguard.training import TrainReport

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

    def train_backdoor(self, job: BackdoorJob) -> TrainReport | None:
        """Train the backdoor into ``job.model`` the attack's own way (EP: only the trigger's embedding
        row) and return its report; None (this default): the standard way, every weight trained on the
        poisoned set (``poisoning.poison_weights``)."""
        return None


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

@dataclass(frozen=True)
class TriggerRequest:
    """What the user asked for (``--trigger``, ``--trigger-count``, the dataset, paraphrase sources);
    each attack's builder reads the part it needs."""

    spec: Sequence[str] | None = None  # BadNet's word list or InSent's sentence
    count: int = 1  # BadNet: words inserted per sample
    dataset: TextDataset | None = None
    paraphrases: Path | None = None
    paraphraser: Paraphraser | None = None


@dataclass(frozen=True)
class AttackEntry:
    name: str
    build: Callable[[TriggerRequest], Trigger]
    options: type  # the trigger dataclass: its fields are the attack's settings
    summary: str
    order: int  # position in listings


# The attacks below register here; modules of peftguard.attacks may register more.
ATTACKS: Registry[AttackEntry] = Registry("attack", "peftguard.attacks")


def register_attack(
    name: str, *, options: type, summary: str, order: int
) -> Callable[[Callable[[TriggerRequest], Trigger]], Callable[[TriggerRequest], Trigger]]:
    """Decorator: register a builder ``TriggerRequest -> Trigger`` as the attack ``name``."""

    def register(build: Callable[[TriggerRequest], Trigger]) -> Callable[[TriggerRequest], Trigger]:
        ATTACKS.register(AttackEntry(name, build, options, summary, order))
        return build

    return register


@register_attack("badnet", options=BadNetTrigger, summary="rare word", order=0)
def _badnet(request: TriggerRequest) -> Trigger:
    return BadNetTrigger(tuple(request.spec) if request.spec else DEFAULT_BADNET_WORDS, request.count)


@register_attack("insent", options=InSentTrigger, summary="sentence", order=1)
def _insent(request: TriggerRequest) -> Trigger:
    return InSentTrigger(" ".join(request.spec) if request.spec else DEFAULT_INSENT_SENTENCE)


@register_attack("synattack", options=SyntacticTrigger, summary="syntactic paraphrase", order=2)
def _syntactic(request: TriggerRequest) -> Trigger:
    """SynAttack reads ``paraphrases`` (default ``<dataset folder>/syntactic``) or, given a
    ``paraphraser``, generates them on demand."""
    from peftguard.paraphrase import ParaphraseTable, default_paraphrase_dir, load_precomputed

    if request.paraphraser is not None:
        if request.paraphrases is not None:
            raise OptionError("give --paraphrases (precomputed files) or --paraphraser (a model), not both")
        return SyntacticTrigger(ParaphraseTable(sources=["generated"]), request.paraphraser)
    if request.dataset is None:
        raise OptionError("synattack needs the dataset whose paraphrases it reads (use build_triggers(..., dataset=...))")
    return SyntacticTrigger(load_precomputed(request.paraphrases or default_paraphrase_dir(request.dataset), request.dataset))


def build_trigger(attack: str, spec: Sequence[str] | None = None, count: int = 1) -> Trigger:
    """A text-level trigger by attack name; ``spec`` is BadNet's word list or InSent's sentence."""
    return ATTACKS[attack].build(TriggerRequest(spec, count))


def build_triggers(
    attacks: Sequence[str],
    *,
    spec: Sequence[str] | None = None,
    count: int = 1,
    dataset: TextDataset | None = None,
    paraphrases: Path | None = None,
    paraphraser: Paraphraser | None = None,
) -> list[Trigger]:
    """One trigger per attack name (several at once for the paper's Table 9)."""
    if not attacks:
        raise OptionError("give at least one --attack")
    if len(set(attacks)) != len(attacks):
        raise OptionError(f"--attack lists a trigger twice: {', '.join(attacks)}")
    if spec and len(attacks) > 1:
        raise OptionError("--trigger sets one attack's trigger; with several --attack values the defaults are used")
    request = TriggerRequest(spec, count, dataset, paraphrases, paraphraser)
    return [ATTACKS[attack].build(request) for attack in attacks]


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
