"""Glue between artifacts on disk and the stages: what the CLI and the Python API call."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftguard import caches
from peftguard.data import TextDataset, subsample
from peftguard.defenses.base import DefenseContext, InputDefense, ModelDefense, Victim
from peftguard.errors import OptionError, PeftguardError
from peftguard.evaluation import EvalSettings, evaluate
from peftguard.models import LoadOptions, load_classifier, load_tokenizer, model_reference
from peftguard.poisoning import MANIFEST as POISONING_MANIFEST
from peftguard.runtime import compute_device
from peftguard.triggers import Trigger
from peftguard.tuning import load_tuned
from peftguard.victims import MANIFEST as VICTIM_MANIFEST


METRICS_KEYS = ("model", "dataset", "clean_accuracy")  # every metrics file evaluate_model writes has these


def load_model(ref: str, num_labels: int, options: LoadOptions = LoadOptions()) -> tuple[Any, Any, dict[str, Any]]:
    """Any model this tool evaluates: a victim folder, a poisoned folder, or a plain classifier, in eval mode on
    :func:`~peftguard.runtime.compute_device` (a GPU when torch sees one)."""
    folder = Path(ref)
    if (folder / VICTIM_MANIFEST).is_file():
        model, tokenizer, manifest = load_tuned(folder, VICTIM_MANIFEST, options)
        if int(manifest["num_labels"]) != num_labels:
            raise PeftguardError(f"{ref} was tuned for {manifest['num_labels']} labels; the dataset has {num_labels}")
        return model.eval().to(compute_device()), tokenizer, manifest
    model = load_classifier(ref, num_labels, options)
    manifest_path = folder / POISONING_MANIFEST
    manifest = {"kind": "poisoned-model" if manifest_path.is_file() else "model", "method": "full"}
    return model.eval().to(compute_device()), load_tokenizer(ref, options), manifest


def build_defense(
    defense: str | None,
    dataset: TextDataset,
    *,
    options: Any = None,
    max_eval_samples: int | None,
    seed: int,
    load_options: LoadOptions = LoadOptions(),
    triggers: Sequence[Trigger] = (),
    target_label: int = 0,
) -> InputDefense | ModelDefense | None:
    """The defense named ``defense`` with its ``options`` dataclass (None: its defaults), from the
    registry in ``defenses/registry.py`` (None: no defense). Input defenses are kept for the process."""
    from peftguard.defenses.registry import build_defense as build

    context = DefenseContext(dataset, tuple(triggers), target_label, seed, max_eval_samples, load_options)
    key = _defense_key(defense, options, context)
    if key in _DEFENSES:
        return _DEFENSES[key]
    built = build(defense, options, context)
    if isinstance(built, InputDefense):  # loaded once per process; its memos then serve every victim
        _reuse_scores(key, built)
        _remember(key, built)
    return built


def bind_defense(defense: InputDefense, victim: Victim) -> InputDefense:
    """``defense`` in front of ``victim``: a defense that reads the victim's predictions is bound to it,
    and kept under the victim's identity too, so that it serves only evaluations of that victim."""
    if not defense.needs_victim:
        return defense
    unbound = next((k for k, v in _DEFENSES.items() if v is defense), None)
    key = (unbound, victim.reference, victim.batch_size, victim.max_length) if unbound else None
    if key is not None and key in _DEFENSES:
        return _DEFENSES[key]
    bound = defense.bind(victim)
    if key is not None:
        _remember(key, bound)
    return bound


# Input defenses already built in this process (a grid evaluates many victims with the same one).
_DEFENSES: dict[tuple, InputDefense] = {}
caches.register("pipeline.defenses", _DEFENSES.clear)
_KEEP_DEFENSES = 4


def _remember(key: tuple, defense: InputDefense) -> None:
    _DEFENSES[key] = defense
    while len(_DEFENSES) > _KEEP_DEFENSES:
        _DEFENSES.pop(next(iter(_DEFENSES)))


# What each victim-independent input defense scored (its ``_memo``: text → ONION's word scores, a
# rewrite), kept after the defense itself is dropped from ``_DEFENSES``. A grid evaluates each victim
# with every defense in turn, so with more defenses than ``_KEEP_DEFENSES`` each one is rebuilt for
# the next victim; the rebuilt one (same key: same options, data and files) starts from this memo
# instead of scoring the test set again. Memos are small beside the models the defenses load.
_SCORED: dict[tuple, dict] = {}
caches.register("pipeline.scored", _SCORED.clear)


def _reuse_scores(key: tuple, defense: InputDefense) -> None:
    memo = getattr(defense, "_memo", None)
    if isinstance(memo, dict) and not defense.needs_victim:
        defense._memo = _SCORED.setdefault(key, memo)


def _defense_key(defense: str | None, options: Any, context: DefenseContext) -> tuple:
    """What a built defense depends on, including the on-disk state of any folder or file its options name."""
    import json

    stamps = tuple(_stamp(value) for value in _option_values(options) if isinstance(value, Path))
    triggers = json.dumps([t.describe() for t in context.triggers], sort_keys=True, default=str)
    data = (context.dataset.name, context.dataset.dev.source, context.dataset.test.source,
            len(context.dataset.dev), len(context.dataset.test))
    return (defense, repr(options), data, triggers, context.target_label, context.seed, context.max_eval_samples,
            context.options, stamps)


def _option_values(options: Any) -> list[Any]:
    from dataclasses import fields, is_dataclass

    return [getattr(options, f.name) for f in fields(options)] if is_dataclass(options) else []


def victim_reference(model_ref: str) -> tuple:
    """Which victim ``model_ref`` is: its reference and, for a folder, the state of its files."""
    path = Path(model_ref)
    return (model_reference(model_ref), _stamp(path) if path.exists() else None)


def _stamp(path: Path) -> tuple:
    """Names, sizes and modification times of a file or a folder's files: changes when it is rewritten."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    return (str(path.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


def evaluate_model(
    model_ref: str,
    dataset: TextDataset,
    triggers: Sequence[Trigger],
    *,
    target_label: int = 0,
    defense: str | None = None,
    defense_options: Any = None,
    max_eval_samples: int | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    seed: int = 0,
    options: LoadOptions = LoadOptions(),
    keep_scores: bool = False,
) -> dict[str, Any]:
    """Load a model and measure CA/ASR (and defended figures), as written to ``metrics.json``.

    ``defense_options`` is the defense's own options dataclass (``defenses.registry``); None: its defaults.
    """
    if not 0 <= target_label < dataset.num_labels:
        raise OptionError(f"--target-label {target_label} is outside 0..{dataset.num_labels - 1}")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {batch_size}")
    screen = build_defense(
        defense, dataset, options=defense_options, max_eval_samples=max_eval_samples, seed=seed,
        load_options=options, triggers=triggers, target_label=target_label,
    )
    model_defense = screen if isinstance(screen, ModelDefense) else None
    screen = None if model_defense else screen
    model, tokenizer, manifest = load_model(model_ref, dataset.num_labels, options)
    if screen is not None:
        screen = bind_defense(screen, Victim(model, tokenizer, victim_reference(model_ref), batch_size, max_length))
    test = subsample(dataset.test.examples, max_eval_samples, seed)
    settings = EvalSettings(batch_size, max_length, seed, keep_scores=keep_scores)
    defended = None  # a model-level defense first: a wrong victim fails before anything is measured
    if model_defense is not None:
        defended = _defended_model(model_defense, model_ref, dataset, test, triggers, target_label, settings, options)
    result = evaluate(model, tokenizer, test, triggers, target_label=target_label, settings=settings, defense=screen)
    if screen is not None:
        result |= screen.reported()
    if screen is not None and screen.sweep():  # further settings of the same defense (ONION's bars)
        result["sweep"] = []
        for label, variant in screen.sweep():
            swept = evaluate(model, tokenizer, test, triggers, target_label=target_label, settings=settings, defense=variant)
            result["sweep"].append({"setting": label, **{k: v for k, v in swept.items() if k.startswith("defended_")}})
    if defended is not None:
        result |= defended
    return {
        "model": model_reference(model_ref),
        "model_kind": manifest.get("kind"),
        "method": manifest.get("method"),
        "dataset": dataset.name,
        **result,
    }


def _defended_model(
    defense: ModelDefense, model_ref: str, dataset: TextDataset, test: list, triggers: Sequence[Trigger],
    target_label: int, settings: EvalSettings, options: LoadOptions,
) -> dict[str, Any]:
    """A model-level defense: make the defended victim, then measure it on the same test sets."""
    import time

    started = time.perf_counter()
    defended_ref = defense.defend(model_ref)
    made = time.perf_counter() - started
    model, tokenizer, _ = load_model(defended_ref, dataset.num_labels, options)
    measured = evaluate(model, tokenizer, test, triggers, target_label=target_label, settings=settings)
    out: dict[str, Any] = {
        "defense": defense.describe(),
        "defended_model": model_reference(defended_ref),
        "defended_clean_accuracy": measured["clean_accuracy"],
        "defense_timing": _cost(time.perf_counter() - started, len(test) + measured.get("triggered_samples", 0), made),
    }
    if "attack_success_rate" in measured:
        out["defended_attack_success_rate"] = measured["attack_success_rate"]
        out["defended_per_trigger"] = {name: {"defended_attack_success_rate": v["attack_success_rate"]}
                                       for name, v in measured.get("per_trigger", {}).items()}
    return out


def _cost(seconds: float, samples: int, defend_seconds: float) -> dict[str, float]:
    """Wall seconds of a model-level defense (making the victim and evaluating it) and samples per second."""
    return {"seconds": round(seconds, 3), "samples_per_second": round(samples / seconds, 2) if seconds > 0 else 0.0,
            "defend_seconds": round(defend_seconds, 3)}
