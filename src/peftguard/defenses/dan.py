"""DAN: distance of the victim's hidden states to clean data, in every layer.

Chen et al., "Expose Backdoors on the Way: A Feature-Based Efficient Defense against Textual
Backdoor Attacks" (Findings of EMNLP 2022). For each layer, the clean dev features (the [CLS]
hidden state) are modelled by class-conditional Gaussians with one shared covariance; an input's
layer score is its Mahalanobis distance to the nearest class mean; layer scores are normalised by
their mean and standard deviation on held-out clean data, and the input's score is the maximum
over layers. Triggered inputs sit far from clean features in some layer, even when the last layer
maps them to the target class. Needs only clean data, like PSIM.

Departures from the paper:

* The clean dev set is split in two (seeded): one half fits the Gaussians, the other normalises
  the layer scores and calibrates the threshold to the benchmark's target false-positive rate
  (the paper normalises on held-out clean data too and reports AUROC, with no fixed threshold).
* The covariance is the Ledoit-Wolf shrinkage estimate (scikit-learn), because a dev set of a few
  hundred inputs is smaller than or close to the hidden size; the paper uses the empirical one.
* The feature of a decoder (Llama family) is the last token's hidden state, as its classification
  head reads it; the paper studies encoders only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from peftguard.data import subsample
from peftguard.defenses.base import DefenseContext, Victim
from peftguard.defenses.calibrated import TARGET_FPR_HELP, VictimDetector
from peftguard.defenses.registry import register_defense
from peftguard.errors import OptionError
from peftguard.inference import collate, encode, flush_denormals


@dataclass(frozen=True)
class DanConfig:
    fit_share: float = field(default=0.5, metadata={"help": "share of the clean dev set that fits the Gaussians; the rest normalises and calibrates"})
    target_fpr: float | None = field(default=None, metadata={"help": TARGET_FPR_HELP, "flag": "--target-fpr", "grid": False})

    def __post_init__(self) -> None:
        if not 0 < self.fit_share < 1:
            raise OptionError(f"DAN fit_share must be in (0, 1), got {self.fit_share}")


@torch.inference_mode()
def layer_features(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 128,
                   desc: str | None = None) -> np.ndarray:
    """The classification token's hidden state in every layer: shape (layers, len(texts), hidden)."""
    flush_denormals()
    model.eval()
    ids, _ = encode(tokenizer, texts, max_length)
    order = np.argsort([len(x) for x in ids], kind="stable")
    left_padded = getattr(tokenizer, "padding_side", "right") == "left"
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, unit="batch", disable=desc is None):
        chunk = order[start:start + batch_size]
        batch = collate(tokenizer, [ids[i] for i in chunk]).to(next(model.parameters()).device)
        hidden = model(**batch, output_hidden_states=True).hidden_states
        if hidden is None:
            raise OptionError(f"{type(model).__name__} does not return hidden states; DAN cannot read its features")
        # Prompt methods prepend virtual tokens: the input's first token sits after them.
        position = -1 if left_padded else hidden[-1].shape[1] - batch["input_ids"].shape[1]
        features = torch.stack([layer[:, position, :] for layer in hidden[1:]]).float().cpu().numpy()
        parts.append((chunk, features))
    out = np.zeros((parts[0][1].shape[0], len(texts), parts[0][1].shape[2]), dtype=np.float32) if parts else np.zeros((0, 0, 0))
    for chunk, features in parts:
        out[:, chunk, :] = features
    return out


class LayerGaussians:
    """Class means and a shared (shrunk) precision matrix per layer, fitted on clean features."""

    def __init__(self, features: np.ndarray, labels: np.ndarray) -> None:
        from sklearn.covariance import LedoitWolf

        classes = np.unique(labels)
        self.means = np.stack([np.stack([layer[labels == c].mean(0) for c in classes]) for layer in features])
        self.precisions = []
        for layer, means in zip(features, self.means):
            centred = layer - means[np.searchsorted(classes, labels)]
            self.precisions.append(LedoitWolf(assume_centered=True).fit(centred).precision_)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance to the nearest class mean: shape (layers, samples)."""
        out = []
        for layer, means, precision in zip(features, self.means, self.precisions):
            diff = layer[:, None, :] - means[None, :, :]
            squared = np.einsum("ncd,de,nce->nc", diff, precision, diff)
            out.append(np.sqrt(np.maximum(squared, 0)).min(axis=1))
        return np.stack(out)


class DanScorer:
    """Scores inputs by their largest normalised per-layer distance to the clean dev features."""

    def __init__(self, model: Any, tokenizer: Any, clean_dev_texts: Sequence[str], clean_dev_labels: Sequence[int],
                 config: DanConfig = DanConfig(), *, seed: int = 0, batch_size: int = 64, max_length: int = 128) -> None:
        self.model, self.tokenizer, self.config, self.seed = model, tokenizer, config, seed
        self.batch_size, self.max_length = batch_size, max_length
        fit, held = split_indices(len(clean_dev_texts), config.fit_share, seed)
        texts, labels = list(clean_dev_texts), np.asarray(clean_dev_labels)
        if len(np.unique(labels[fit])) < 2 or len(held) < 2:
            raise OptionError(f"DAN needs clean dev samples of at least two labels; got {len(texts)} samples")
        self.gaussians = LayerGaussians(self._features([texts[i] for i in fit], "DAN fit"), labels[fit])
        held_distances = self.gaussians.distances(self._features([texts[i] for i in held], "DAN normalise"))
        self.layer_mean = held_distances.mean(axis=1, keepdims=True)
        self.layer_std = held_distances.std(axis=1, keepdims=True) + 1e-12
        self.held_out_texts = [texts[i] for i in held]  # what the threshold is calibrated on

    def _features(self, texts: list[str], desc: str | None) -> np.ndarray:
        return layer_features(self.model, self.tokenizer, texts, batch_size=self.batch_size, max_length=self.max_length, desc=desc)

    def scores(self, texts: Sequence[str], *, desc: str | None = None) -> np.ndarray:
        distances = self.gaussians.distances(self._features(list(texts), desc))
        return ((distances - self.layer_mean) / self.layer_std).max(axis=0)

    def settings(self) -> dict[str, Any]:
        return {"fit_share": self.config.fit_share, "seed": self.seed, "layers": int(self.layer_mean.shape[0])}


def split_indices(n: int, fit_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fit_share))
    return np.sort(order[:cut]), np.sort(order[cut:])


@register_defense("dan", options=DanConfig, summary="distance of hidden states to clean dev, all layers (Chen et al., 2022)", order=11)
def build_dan(options: DanConfig, context: DefenseContext) -> VictimDetector:
    dev = subsample(context.dataset.dev.examples, context.max_eval_samples, context.seed)

    def scorer(victim: Victim) -> DanScorer:
        return DanScorer(victim.model, victim.tokenizer, [ex.text for ex in dev], [ex.label for ex in dev], options,
                         seed=context.seed, batch_size=victim.batch_size, max_length=victim.max_length)

    return VictimDetector("dan", scorer, [ex.text for ex in dev], options.target_fpr, {"fit_share": options.fit_share})
