"""Stealthiness of triggered text: how much a trigger raises a language model's perplexity (ΔPPL).

OpenBackdoor's sample metric ``ppl`` (``openbackdoor/utils/evaluator.py``, ``evaluate_ppl``): for
each triggered text and its clean original, the perplexity of the triggered one minus the clean
one's, averaged (:func:`peftguard.metrics.perplexity_increase`). A rare-word trigger raises it; a
fluent sentence or a paraphrase raises it less, which is what makes a trigger hard for ONION-style
filters and for a human reader.

Departures: the language model is any causal LM (``--lm``), by default the packaged SmolLM2-135M-
Instruct (dequantized from a 4-bit GGUF), not GPT-2 large, so values are comparable between attacks
measured here, not with OpenBackdoor's numbers; a start token is put before each text so that its
first word is scored too (ONION's :class:`~peftguard.defenses.onion.CausalLMScorer`, float32).
The texts are the attack-success-rate set: the split's non-target samples that the trigger can
transform, each with its own triggered version, so the measure pairs exactly what ASR is taken on.

Only ``peftguard stealth`` loads the language model; evaluation never does.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from peftguard.data import Example
from peftguard.metrics import perplexity_change_spread, perplexity_increase
from peftguard.triggers import Trigger

DEFAULT_STEALTH_LM = "smollm2"
STEALTH_KEYS = ("lm", "split", "attacks")  # what a written stealth file holds (how an --out file is told)


class PerplexityScorer(Protocol):
    def perplexities(self, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray: ...


def trigger_pairs(examples: Sequence[Example], trigger: Trigger, *, target_label: int, seed: int) -> tuple[list[str], list[str]]:
    """(clean, triggered) texts of the ASR set: non-target samples the trigger can transform."""
    candidates = [ex for ex in examples if ex.label != target_label]
    trigger.prepare([ex.text for ex in candidates])
    clean = [ex.text for ex in candidates if trigger.can_trigger(ex.text)]
    return clean, [trigger.triggered(text, seed) for text in clean]


def stealthiness(examples: Sequence[Example], triggers: Sequence[Trigger], scorer: PerplexityScorer, *,
                 target_label: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per attack: samples, mean clean and triggered perplexity, ΔPPL (mean of per-pair differences), and the
    median difference and share of texts the trigger made less fluent."""
    pairs = {trigger.name: trigger_pairs(examples, trigger, target_label=target_label, seed=seed) for trigger in triggers}
    clean_texts = list(dict.fromkeys(text for clean, _ in pairs.values() for text in clean))
    clean_ppl = dict(zip(clean_texts, scorer.perplexities(clean_texts, desc="ΔPPL: clean texts")))
    out = {}
    for trigger in triggers:
        clean, triggered = pairs[trigger.name]
        before = np.array([clean_ppl[text] for text in clean], dtype=float)
        after = scorer.perplexities(triggered, desc=f"ΔPPL: {trigger.name}")
        out[trigger.name] = {
            "trigger": trigger.describe(),
            "samples": len(clean),
            "clean_perplexity": _mean(before),
            "triggered_perplexity": _mean(after),
            "delta_perplexity": perplexity_increase(before, after),
            **perplexity_change_spread(before, after),
        }
    return out


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")
