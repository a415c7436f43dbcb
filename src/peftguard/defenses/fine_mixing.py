"""Fine-mixing (Zhang et al., Findings of EMNLP 2022, "Fine-mixing: Mitigating Backdoors in Fine-tuned
Language Models"), the model-level baseline of the PSIM paper's Table 10.

The suspect weights are mixed with the clean pretrained weights they were made from: each weight
keeps its suspect value with probability rho (the mixing ratio) and takes its clean pretrained
value otherwise; the mixed model is then fine-tuned on clean data and used as the victim.
rho = 0 gives the clean model exactly, rho = 1 the suspect model exactly.

Departures from the paper:

* What is mixed: in the PSIM threat model the backdoor sits in the downloaded foundation, so the
  poisoned foundation (the victim's ``base_model``) is mixed and the victim's own fine-tuning is
  replayed on it (same method, settings, seed and training subset); the paper mixes a fully
  fine-tuned backdoored model and then fine-tunes all of its weights.
* Random mixing only: neither Embedding Purification (E-PUR) nor the weight selection of
  "Fine-mixing (Sel)".
* The classification head has no pretrained counterpart: its clean side is a freshly initialised
  head (seeded), what the clean model gets when loaded as a classifier.
* rho: the paper tunes it per task; here, unless ``--mix-ratio`` fixes it, it is chosen on clean dev
  data by :class:`RatioSearch`, whose criterion was fixed before any result was seen: try rho = 0.1,
  0.3, 0.5, 0.7, 0.9 in turn (least suspect weight first, i.e. strongest purification first) and keep
  the first whose fine-mixed victim's clean dev accuracy is within 2 points of the undefended victim's
  on the same dev subset; if none is, the one with the best clean dev accuracy. The fine-tuning replayed
  on each candidate is the victim's own (method, settings, seed, training subset). No triggered or
  test data is read.
* Classifier victims only: an instruction-tuned causal LM (label words) is refused.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftguard.artifacts import atomic_dir, write_json
from peftguard.bounds import BOUNDS
from peftguard.data import TextDataset, subsample
from peftguard.defenses.base import DefenseContext, ModelDefense
from peftguard.defenses.registry import register_defense
from peftguard.errors import OptionError, PeftguardError
from peftguard.instruction import read_template
from peftguard.manifests import ReplayableVictimManifest, read_manifest
from peftguard.models import LoadOptions, check_max_length, load_classifier, load_tokenizer, model_reference
from peftguard.poisoning import read_poisoning_manifest
from peftguard.training import TrainSettings, check_length_budget, seed_everything, train_classifier, training_record
from peftguard.tuning import METHODS, MethodConfig, load_tuned, make_tunable, method_config, method_name, write_tuned
from peftguard.victims import MANIFEST as VICTIM_MANIFEST

MIXED_FOLDER = "mixed"  # inside a fine-mixed PEFT victim: the mixed base its adapter sits on
MIXED_MANIFEST = "fine_mixing.json"


@dataclass(frozen=True)
class FineMixingConfig:
    mix_ratio: float | None = field(default=None, metadata={
        "help": "share of weights kept from the suspect (0: clean, 1: suspect); None: chosen on clean dev (RatioSearch)"})
    clean_model: str | None = field(default=None, metadata={"help": "clean pretrained model [poisoning.json's base_model]"})
    seed: int = field(default=0, metadata={"help": "seed of the mixing mask"})

    def validate(self) -> None:
        if self.mix_ratio is not None:
            BOUNDS["mix_ratio"].check(self.mix_ratio, "--mix-ratio")


@dataclass(frozen=True)
class RatioSearch:
    """How the mixing ratio is chosen on clean dev data (module docstring); fixed a priori, not tuned on results.

    ``ratios`` are tried in this order (least suspect weight first); the first whose fine-mixed victim's
    best clean dev accuracy is at least the undefended victim's minus ``tolerance`` is kept.
    """

    ratios: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    tolerance: float = 0.02

    def as_dict(self) -> dict[str, Any]:
        """As a manifest records it (JSON: lists), so that a reread request equals a new one."""
        return {"ratios": list(self.ratios), "tolerance": self.tolerance}

    def criterion(self) -> str:
        return (f"first of {list(self.ratios)} whose clean dev accuracy >= the victim's - {self.tolerance}; "
                "else the best clean dev accuracy")

    def choose(self, tried: list[dict[str, float]], reference: float) -> float | None:
        """The ratio to keep once ``tried`` is final, or None while the search should go on."""
        if tried and tried[-1]["dev_accuracy"] >= reference - self.tolerance:
            return tried[-1]["mix_ratio"]
        if len(tried) < len(self.ratios):
            return None
        return max(tried, key=lambda t: t["dev_accuracy"])["mix_ratio"]


RATIO_SEARCH = RatioSearch()


def mix_state_dicts(
    clean: dict[str, torch.Tensor], suspect: dict[str, torch.Tensor], ratio: float, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Each float weight from ``suspect`` with probability ``ratio``, else from ``clean`` (seeded mask)."""
    FineMixingConfig(mix_ratio=ratio).validate()
    if clean.keys() != suspect.keys():
        differ = sorted(set(clean) ^ set(suspect))
        raise PeftguardError(f"the clean and suspect models differ in architecture: {', '.join(differ[:4])}")
    generator = torch.Generator().manual_seed(seed)
    mixed: dict[str, torch.Tensor] = {}
    kept = total = 0
    for name in sorted(suspect):
        s, c = suspect[name], clean[name]
        if s.shape != c.shape:
            raise PeftguardError(f"the clean and suspect models differ at {name}: {tuple(c.shape)} vs {tuple(s.shape)}")
        if not s.is_floating_point():
            mixed[name] = s.clone()  # integer buffers (position ids) are not weights
            continue
        mask = torch.rand(s.shape, generator=generator) < ratio  # rand is in [0, 1): ratio 1 keeps all
        mixed[name] = torch.where(mask, s, c.to(s.dtype))
        kept, total = kept + int(mask.sum()), total + mask.numel()
    return mixed, {"kept_from_suspect": kept / total if total else float("nan"), "weights": total}


def find_clean_model(suspect_ref: str, clean_model: str | None) -> str:
    """``clean_model``, or the model a poisoned folder started from (its poisoning.json)."""
    if clean_model is not None:
        return clean_model
    manifest = read_poisoning_manifest(suspect_ref) if Path(suspect_ref).is_dir() else None
    if manifest is None or not manifest.get("base_model"):
        raise OptionError(f"cannot tell which clean model '{suspect_ref}' started from (no poisoning.json); "
                          "give --clean-model")
    return str(manifest["base_model"])


def mixed_classifier(suspect_ref: str, clean_ref: str, num_labels: int, ratio: float, seed: int,
                     options: LoadOptions = LoadOptions()) -> tuple[Any, dict[str, Any]]:
    """The suspect classifier with its weights mixed with the clean model's (seeded head init)."""
    seed_everything(seed)
    suspect = load_classifier(suspect_ref, num_labels, options)
    clean = load_classifier(clean_ref, num_labels, options)
    state, stats = mix_state_dicts(clean.state_dict(), suspect.state_dict(), ratio, seed)
    suspect.load_state_dict(state)
    return suspect, stats


@dataclass
class ReplayPlan:
    """How a victim was made: the weights it started from, its method, settings and data size."""

    suspect: str
    config: MethodConfig
    settings: TrainSettings
    train_samples: int | None


def replay_plan(victim: str | Path) -> ReplayPlan:
    path = Path(victim) / VICTIM_MANIFEST
    if not path.is_file():
        raise OptionError(f"{victim} is not a victim folder (no {VICTIM_MANIFEST}); Fine-mixing replays a victim's "
                          "fine-tuning on mixed weights (for a poisoned model: `peftguard defend fine-mixing "
                          "--model POISONED --method M`)")
    if read_template(Path(victim)) is not None:
        raise OptionError(f"{victim} is an instruction-tuned LM; Fine-mixing here handles classifiers only")
    manifest = read_manifest(path, ReplayableVictimManifest)
    try:
        config = method_config(manifest["method"], **manifest.get("method_config", {}))
    except OptionError as exc:
        raise PeftguardError(f"{path}: method_config: {exc}") from None
    known = {f.name for f in fields(TrainSettings)}
    settings = TrainSettings(**{k: v for k, v in manifest["settings"].items() if k in known})
    return ReplayPlan(str(manifest["base_model"]), config, settings, manifest.get("train_samples"))


def fine_mix(
    suspect_ref: str,
    dataset: TextDataset,
    config: MethodConfig,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    mixing: FineMixingConfig = FineMixingConfig(),
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    source_victim: str | None = None,
    request: dict[str, Any] | None = None,
    options: LoadOptions = LoadOptions(),
) -> dict[str, Any]:
    """Mix ``suspect_ref`` with its clean model, fine-tune with ``config``'s method, save a victim folder.

    A PEFT victim keeps its mixed base in ``<out_dir>/mixed``; a full victim holds all weights itself.
    """
    mixing.validate()
    if mixing.mix_ratio is None:
        raise OptionError("Fine-mixing of a poisoned model needs --mix-ratio (the dev search compares with a victim)")
    settings.validate()
    check_length_budget(config, settings)
    if Path(suspect_ref).is_dir() and read_template(Path(suspect_ref)) is not None:
        raise OptionError(f"{suspect_ref} is an instruction-tuned LM; Fine-mixing here handles classifiers only")
    clean_ref = find_clean_model(suspect_ref, mixing.clean_model)
    started = time.perf_counter()
    train = subsample(dataset.train.examples, max_train_samples, settings.seed)
    dev = subsample(dataset.dev.examples, max_eval_samples, settings.seed)  # picks the best epoch, as in finetune
    model, stats = mixed_classifier(suspect_ref, clean_ref, dataset.num_labels, mixing.mix_ratio, mixing.seed, options)
    check_max_length(model, settings.max_length, config.virtual_tokens)
    tokenizer = load_tokenizer(suspect_ref, options)
    out_dir = Path(out_dir).resolve()
    full = METHODS[method_name(config)].peft_type is None
    record = {
        "name": "fine-mixing", "mix_ratio": mixing.mix_ratio, "mask_seed": mixing.seed,
        "clean_model": model_reference(clean_ref), "suspect_model": model_reference(suspect_ref),
        "source_victim": source_victim, "request": request, **stats,
    }
    with atomic_dir(out_dir) as tmp:
        if not full:
            write_tuned(tmp / MIXED_FOLDER, model, tokenizer, MIXED_MANIFEST, {"kind": "fine-mixed-model", **record})
        seed_everything(settings.seed)
        model = make_tunable(model, config)
        report = train_classifier(model, tokenizer, train, dev, settings,
                                  desc=f"fine-mixing {method_name(config)}")
        base_model = str(out_dir / MIXED_FOLDER) if not full else model_reference(suspect_ref)
        manifest = replayed_victim_manifest(config, base_model, dataset, len(train),
                                            {**record, "seconds": round(time.perf_counter() - started, 2)},
                                            training_record(model, settings, report))
        write_tuned(tmp, model, tokenizer, VICTIM_MANIFEST, manifest)
    return manifest


def replayed_victim_manifest(config: MethodConfig, base_model: str, dataset: TextDataset, train_samples: int,
                             defense: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """The victim manifest of a defense that replays the victim's fine-tuning (fine-mixing, fine-pruning): a victim
    as `finetune` writes one, plus the defense's record."""
    return {"kind": "victim", "method": method_name(config), "method_config": asdict(config), "base_model": base_model,
            "num_labels": dataset.num_labels, "dataset": dataset.name, "train_samples": train_samples,
            "defense": defense, **training}


class FineMixingDefense(ModelDefense):
    """Fine-mixing as a model-level defense: a victim folder in, a fine-mixed victim folder out.

    ``out_dir`` is reused when it already holds a fine-mixed victim of the same victim and settings.
    """

    name = "fine-mixing"

    def __init__(self, config: FineMixingConfig, dataset: TextDataset, *, out_dir: Path | None = None,
                 max_train_samples: int | None = None, max_eval_samples: int | None = None,
                 options: LoadOptions = LoadOptions()) -> None:
        config.validate()
        self.config, self.dataset, self.options = config, dataset, options
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self._tmp = None if out_dir else tempfile.TemporaryDirectory(prefix="peftguard-fine-mixing-")
        self.out_dir = Path(out_dir) if out_dir else Path(self._tmp.name) / "victim"
        self.manifest: dict[str, Any] | None = None

    def defend(self, victim: str) -> str:
        plan = replay_plan(victim)
        samples = self.max_train_samples if self.max_train_samples is not None else plan.train_samples
        request = {"victim": model_reference(victim), "dataset": self.dataset.name, "max_train_samples": samples,
                   "max_eval_samples": self.max_eval_samples, **asdict(self.config),
                   **({"search": RATIO_SEARCH.as_dict()} if self.config.mix_ratio is None else {})}
        existing = self.out_dir / VICTIM_MANIFEST
        if existing.is_file():
            manifest = read_manifest(existing)
            record = manifest.get("defense", {})
            if record.get("request") != request:
                raise OptionError(f"{self.out_dir} holds another fine-mixed victim; choose another --fine-mixed "
                                  "folder or remove it")
            if self.config.mix_ratio is not None or "selection" in record:  # not a candidate of a search cut short
                self.manifest = manifest  # made earlier with the same settings: reuse it
                return str(self.out_dir)
        if self.config.mix_ratio is not None:
            self.manifest = self._mix(plan, victim, samples, request, self.config)
        else:
            self.manifest = self._search(plan, victim, samples, request)
        return str(self.out_dir)

    def _mix(self, plan: ReplayPlan, victim: str, samples: int | None, request: dict[str, Any],
             mixing: FineMixingConfig) -> dict[str, Any]:
        return fine_mix(plan.suspect, self.dataset, plan.config, plan.settings, self.out_dir,
                        mixing=mixing, max_train_samples=samples, max_eval_samples=self.max_eval_samples,
                        source_victim=model_reference(victim), request=request, options=self.options)

    def _search(self, plan: ReplayPlan, victim: str, samples: int | None, request: dict[str, Any]) -> dict[str, Any]:
        """Fine-mix at each ratio of :data:`RATIO_SEARCH` until its criterion picks one (each candidate is
        written to ``out_dir`` in turn, so the last one made is kept unless the criterion falls back)."""
        reference = dev_accuracy(victim, self.dataset, self.max_eval_samples, plan.settings, self.options)
        tried: list[dict[str, float]] = []
        chosen = None
        for ratio in RATIO_SEARCH.ratios:
            manifest = self._mix(plan, victim, samples, request, replace(self.config, mix_ratio=ratio))
            tried.append({"mix_ratio": ratio, "dev_accuracy": max(manifest["training"]["dev_accuracy"] or [0.0])})
            chosen = RATIO_SEARCH.choose(tried, reference)
            if chosen is not None:
                break
        if chosen != tried[-1]["mix_ratio"]:  # the fallback: remake the best candidate (same seeds: the same model)
            manifest = self._mix(plan, victim, samples, request, replace(self.config, mix_ratio=chosen))
        manifest["defense"]["selection"] = {"criterion": RATIO_SEARCH.criterion(), "victim_dev_accuracy": reference,
                                            "tried": tried, "chosen": chosen}
        write_json(self.out_dir / VICTIM_MANIFEST, manifest)
        return manifest

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "mix_ratio": self.config.mix_ratio, "clean_model": self.config.clean_model,
               "fine_mixed": None if self._tmp else str(self.out_dir)}
        if self.manifest is not None:
            made = self.manifest
            out |= {**made["defense"], "method": made["method"], "train_samples": made["train_samples"],
                    "training_seconds": made["training"]["seconds"]}
        return out


def dev_accuracy(victim: str, dataset: TextDataset, max_eval_samples: int | None, settings: TrainSettings,
                 options: LoadOptions) -> float:
    """The victim's accuracy on the clean dev subset its fine-tuning (and its replay) selects epochs on."""
    from peftguard.inference import predict_proba

    dev = subsample(dataset.dev.examples, max_eval_samples, settings.seed)
    model, tokenizer, _ = load_tuned(victim, VICTIM_MANIFEST, options)
    predicted = predict_proba(model, tokenizer, [ex.text for ex in dev], settings.batch_size, settings.max_length,
                              desc="fine-mixing: victim on clean dev").argmax(1)
    return float((predicted == np.array([ex.label for ex in dev])).mean()) if dev else 0.0


@dataclass(frozen=True)
class FineMixingOptions:
    mix_ratio: float | None = field(default=None, metadata={
        "help": "share of weights kept from the suspect model [chosen on clean dev: the first of "
                f"{list(RATIO_SEARCH.ratios)} within {RATIO_SEARCH.tolerance} of the victim's dev accuracy]",
        "flag": "--mix-ratio"})
    clean_model: str | None = field(default=None, metadata={
        "help": "the clean pretrained model [from poisoning.json]", "flag": "--clean-model"})
    fine_mixed: Path | None = field(default=None, metadata={
        "help": "keep the fine-mixed victim here (reused if it holds the same one) [temporary]", "flag": "--fine-mixed",
        "grid": False})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "clean training subset [the victim's]", "flag": "--max-train-samples", "grid": False})

    def label(self) -> str:
        """The setting a report row names."""
        ratio = "ratio chosen on clean dev" if self.mix_ratio is None else f"ratio {self.mix_ratio:g}"
        return f"{ratio}, victim's fine-tuning replayed"


@register_defense("fine-mixing", options=FineMixingOptions,
                  summary="mix weights with the clean model, fine-tune again (Zhang et al., 2022)", order=4)
def build_fine_mixing(options: FineMixingOptions, context: DefenseContext) -> FineMixingDefense:
    """Fine-mixing seeded by the evaluation; a grid stage keeps the new victim in its own folder."""
    config = FineMixingConfig(mix_ratio=options.mix_ratio, clean_model=options.clean_model, seed=context.seed)
    return FineMixingDefense(config, context.dataset, out_dir=options.fine_mixed, max_train_samples=options.max_train_samples,
                             max_eval_samples=context.max_eval_samples, options=context.options)
