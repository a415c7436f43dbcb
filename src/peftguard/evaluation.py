"""CA and ASR of a model, with or without an input defense, as a ``metrics.json`` record."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from peftguard import metrics
from peftguard.data import Example
from peftguard.defenses.base import InputDefense
from peftguard.training import count_truncated, predict_proba
from peftguard.triggers import Trigger, triggered_test_set, untriggerable


@dataclass
class EvalSettings:
    batch_size: int = 64
    max_length: int = 128
    seed: int = 0
    keep_scores: bool = False  # add each sample's detector score to the result (for ROC curves)


@dataclass
class TriggeredSet:
    """The ASR set of one trigger, as a slice of the pooled triggered inputs."""

    name: str
    start: int
    stop: int
    untriggerable: int


def evaluate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    test: list[Example],
    triggers: Sequence[Trigger],
    *,
    target_label: int,
    settings: EvalSettings = EvalSettings(),
    defense: InputDefense | None = None,
) -> dict[str, Any]:
    """Metrics on the clean test set and on the triggered non-target part, per trigger and pooled."""
    labels = np.array([ex.label for ex in test])
    triggered, sets = _triggered_sets(test, triggers, target_label, settings.seed)
    started = time.perf_counter()

    def classify(texts: list[str], desc: str) -> np.ndarray:
        return predict_proba(model, tokenizer, texts, settings.batch_size, settings.max_length, desc=desc).argmax(1)

    clean_predictions = classify([ex.text for ex in test], "clean test")
    result: dict[str, Any] = {
        "clean_accuracy": metrics.clean_accuracy(clean_predictions, labels),
        "clean_samples": len(test),
        "clean_correct": int((clean_predictions == labels).sum()),
        "target_label": target_label,
        "seed": settings.seed,
    }
    triggered_predictions = np.zeros(0, dtype=int)
    if triggers:
        triggered_predictions = classify([ex.text for ex in triggered], "triggered test")
        result |= {
            "attack_success_rate": metrics.attack_success_rate(triggered_predictions, target_label),
            "triggered_samples": len(triggered),
            "attack_successes": int((triggered_predictions == target_label).sum()),
            "triggers": [t.describe() for t in triggers],
            "per_trigger": {
                s.name: {
                    "attack_success_rate": metrics.attack_success_rate(triggered_predictions[s.start:s.stop], target_label),
                    "triggered_samples": s.stop - s.start,
                    "untriggerable": s.untriggerable,
                }
                for s in sets
            },
        }
    result["truncated_texts"] = {  # cut to --max-length tokens (cached counts, no second tokenization)
        "clean": count_truncated(tokenizer, [ex.text for ex in test], settings.max_length),
        "triggered": count_truncated(tokenizer, [ex.text for ex in triggered], settings.max_length),
    }
    undefended_seconds = time.perf_counter() - started
    result["timing"] = _timing(undefended_seconds, len(test) + len(triggered))
    if defense is not None:
        def classify_reusing(texts: list[str], desc: str) -> np.ndarray:
            # An unchanged input set (a detector such as PSIM) needs no second victim pass.
            if texts == [ex.text for ex in test]:
                return clean_predictions
            if triggers and texts == [ex.text for ex in triggered]:
                return triggered_predictions
            return classify(texts, desc)

        defended, attacked = _defended(defense, classify_reusing, test, labels, triggered, target_label, settings.keep_scores)
        result |= defended
        for s in sets:
            result["per_trigger"][s.name] |= _defended_slice(*attacked, s, target_label)
    return result


def _triggered_sets(
    test: list[Example], triggers: Sequence[Trigger], target_label: int, seed: int
) -> tuple[list[Example], list[TriggeredSet]]:
    names = [t.name for t in triggers]
    pooled: list[Example] = []
    sets = []
    for index, trigger in enumerate(triggers):
        name = trigger.name if names.count(trigger.name) == 1 else f"{trigger.name}-{index}"
        part = triggered_test_set(test, trigger, target_label=target_label, seed=seed)
        sets.append(TriggeredSet(name, len(pooled), len(pooled) + len(part),
                                 untriggerable(test, trigger, target_label=target_label)))
        pooled.extend(part)
    return pooled, sets


def _defended(
    defense: InputDefense,
    classify: Any,
    test: list[Example],
    labels: np.ndarray,
    triggered: list[Example],
    target_label: int,
    keep_scores: bool = False,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """Defended metrics, and the victim's predictions and flags on the triggered inputs."""
    started = time.perf_counter()
    clean = defense.screen([ex.text for ex in test], desc=f"{defense.name} clean")
    clean_predictions = classify(clean.texts, "defended clean")
    clean_flags = _flags(clean, len(test))
    out: dict[str, Any] = {
        "defense": defense.describe(),
        "defended_clean_accuracy": metrics.defended_clean_accuracy(clean_predictions, labels, clean_flags),
        "false_positive_rate": float(clean_flags.mean()),
    }
    attacked_predictions, attacked_flags = np.zeros(0, dtype=int), np.zeros(0, dtype=bool)
    if triggered:
        attacked = defense.screen([ex.text for ex in triggered], desc=f"{defense.name} triggered")
        attacked_predictions = classify(attacked.texts, "defended triggered")
        attacked_flags = _flags(attacked, len(triggered))
        out |= {
            "defended_attack_success_rate": metrics.defended_attack_success_rate(
                attacked_predictions, target_label, attacked_flags
            ),
            "detection_rate": float(attacked_flags.mean()),
        }
        if clean.scores is not None and attacked.scores is not None:
            out["auroc"] = metrics.auroc(clean.scores, attacked.scores)
            out["confidence_histogram"] = {
                "clean": metrics.confidence_histogram(clean.scores),
                "triggered": metrics.confidence_histogram(attacked.scores),
            }
            if keep_scores:
                out["scores"] = {"clean": np.round(clean.scores, 6).tolist(), "triggered": np.round(attacked.scores, 6).tolist()}
    out["defense_timing"] = _timing(time.perf_counter() - started, len(test) + len(triggered))
    return out, (attacked_predictions, attacked_flags)


def _defended_slice(predictions: np.ndarray, flags: np.ndarray, s: TriggeredSet, target_label: int) -> dict[str, float]:
    part = slice(s.start, s.stop)
    return {
        "defended_attack_success_rate": metrics.defended_attack_success_rate(predictions[part], target_label, flags[part]),
        "detection_rate": float(flags[part].mean()) if s.stop > s.start else float("nan"),
    }


def _flags(screened: Any, n: int) -> np.ndarray:
    return np.zeros(n, dtype=bool) if screened.flagged is None else np.asarray(screened.flagged, dtype=bool)


def _timing(seconds: float, samples: int) -> dict[str, float]:
    return {"seconds": round(seconds, 3), "samples_per_second": round(samples / seconds, 2) if seconds > 0 else 0.0}
