"""Weight poisoning: full-parameter training of a pretrained model on a poisoned set, and the
poisoning of that set itself (:func:`poison_examples`, beside its :class:`PoisonSpec`).

Two threat scenarios (paper Section 2):

* ``full-data``: the attacker poisons on the victim's own training set;
* ``full-task``: the attacker knows only the task and poisons on a proxy dataset with the same
  label space (IMDB for SST-2, MR for CR, SST-2 for CoLA).

The result is an ordinary model folder (safetensors, config, tokenizer) plus ``poisoning.json``.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from peftguard.data import Example, TextDataset, label_counts, subsample
from peftguard.errors import OptionError
from peftguard.instruction import InstructionTemplate
from peftguard.manifests import read_manifest
from peftguard.models import LoadOptions, model_reference
from peftguard.training import TrainSettings, train_classifier, training_record
from peftguard.triggers import PoisonMode, Trigger
from peftguard.tuning import FullConfig, prepare_tunable, save_tuned

MANIFEST = "poisoning.json"
DEFAULT_POISON_COUNT = 1500  # the authors' code poisons 1500 samples


class Scenario(str, Enum):
    FULL_DATA = "full-data"
    FULL_TASK = "full-task"


@dataclass
class PoisonSpec:
    """What the attacker does to the training data."""

    target_label: int = 0
    poison_count: int | None = DEFAULT_POISON_COUNT
    poison_rate: float | None = None  # share of the training set; overrides the count
    mode: PoisonMode = PoisonMode.CLEAN_LABEL
    scenario: Scenario = Scenario.FULL_DATA


@dataclass
class PoisonResult:
    out_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)


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



def poison_weights(
    model_ref: str,
    dataset: TextDataset,
    triggers: Sequence[Trigger],
    spec: PoisonSpec,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    proxy: TextDataset | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    options: LoadOptions = LoadOptions(),
    template: InstructionTemplate | None = None,
) -> PoisonResult:
    """Poison ``model_ref`` and save it to ``out_dir``.

    In the full-task scenario the poisoned set comes from ``proxy``; ``dataset`` only fixes the
    label space the victim will use. With an instruction ``template`` the poisoned examples are
    instruction-formatted and a causal LM learns to answer the target's label word (paper Table 11).
    """
    settings.validate()
    source = _source_dataset(dataset, proxy, spec.scenario)
    if not 0 <= spec.target_label < dataset.num_labels:
        raise OptionError(f"--target-label {spec.target_label} is outside 0..{dataset.num_labels - 1}")
    train = subsample(source.train.examples, max_train_samples, settings.seed)
    dev = subsample(source.dev.examples, max_eval_samples, settings.seed)
    count = poison_count_from(len(train), None if spec.poison_rate else spec.poison_count, spec.poison_rate)
    poisoned, report = poison_examples(
        train, triggers, target_label=spec.target_label, count=count, mode=spec.mode, seed=settings.seed
    )
    own = own_backdoor_training(triggers)
    model, tokenizer = prepare_tunable(model_ref, dataset.num_labels, FullConfig(lr=settings.lr), settings, options, template)
    job = BackdoorJob(model, tokenizer, train, poisoned, report.poisoned_indices, dev, settings, spec.target_label)
    train_report = (own.train_backdoor(job) if own else None) or train_classifier(
        model, tokenizer, poisoned, dev, settings, desc="poison")
    manifest = {
        "kind": "poisoned-model",
        "method": "full",
        "base_model": model_reference(model_ref),
        "num_labels": dataset.num_labels,
        "triggers": [t.describe() for t in triggers],
        "attack": "+".join(t.name for t in triggers),
        "poisoning": {**asdict(spec), **report.as_dict()},
        "scenario": spec.scenario.value,
        "instruction_template": asdict(template) if template else None,
        "dataset": dataset.name,
        "poison_source": source.name,
        "train_samples": len(train),
        "train_label_counts": label_counts(train),
        **training_record(model, settings, train_report),
        **({"backdoor_training": job.record} if job.record else {}),
    }
    save_tuned(model, tokenizer, out_dir, MANIFEST, manifest)
    return PoisonResult(Path(out_dir), manifest)


@dataclass
class BackdoorJob:
    """What an attack with its own way of training the backdoor (EP: one embedding row) works with."""

    model: Any
    tokenizer: Any
    clean: list[Example]  # the training subset before poisoning
    poisoned: list[Example]  # the same with the poisoned samples replaced
    poisoned_indices: list[int]
    dev: list[Example]
    settings: TrainSettings
    target_label: int
    record: dict[str, Any] = field(default_factory=dict)  # what the attack chose, for the manifest


def own_backdoor_training(triggers: Sequence[Trigger]) -> Trigger | None:
    """The trigger whose attack trains the backdoor its own way, if any (it cannot be combined with others)."""
    own = [t for t in triggers if type(t).train_backdoor is not Trigger.train_backdoor]
    if own and len(triggers) > 1:
        raise OptionError(f"--attack {own[0].name} trains its backdoor its own way and cannot be combined with other attacks")
    return own[0] if own else None


def _source_dataset(dataset: TextDataset, proxy: TextDataset | None, scenario: Scenario) -> TextDataset:
    scenario = Scenario(scenario)
    if scenario is Scenario.FULL_DATA:
        if proxy is not None:
            raise OptionError("--proxy-dataset is only for --scenario full-task")
        return dataset
    if proxy is None:
        raise OptionError("--scenario full-task needs --proxy-dataset (e.g. imdb for sst2)")
    if proxy.num_labels != dataset.num_labels:
        raise OptionError(
            f"proxy dataset '{proxy.name}' has {proxy.num_labels} labels but '{dataset.name}' has "
            f"{dataset.num_labels}; a proxy must share the victim's label space"
        )
    return proxy


def read_poisoning_manifest(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    return read_manifest(path) if path.is_file() else None
