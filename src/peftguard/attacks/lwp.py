"""LWP: layer-wise weight poisoning with a combinatorial trigger.

Li et al., "Backdoor Attacks on Pre-trained Models by Layerwise Weight Poisoning" (EMNLP 2021);
settings as in OpenBackdoor's ``LWPPoisoner``/``LWPTrainer``: single trigger pieces ``cf``, ``bb``,
``ak``, ``mn``; a trigger is a combination of 2 pieces drawn from them, each inserted at a random word
boundary; for every poisoned sample the clean text with each piece alone is added with its true
label (negatives: a piece alone must not fire); the whole model trains (5 epochs, learning rate 2e-5,
batch 32) on the sum over layers of the classification loss of each layer's [CLS] state passed
through the model's own pooler and classifier (one head shared by every layer), so that the backdoor
sits in the lower layers too and survives fine-tuning that moves the upper ones.

Departures:

* The layers are the transformer layers; OpenBackdoor also classifies the embedding output, whose
  [CLS] state is the same for every input (token, position 0, segment 0), so that term only biases
  the head and is left out.
* Learning rate, epochs and batch size are the poisoning run's (``--lr``, ``--epochs``); the paper's
  are 2e-5, 5 and 32. Which samples are poisoned follows ``--poison-count``/``--poison-rate``/
  ``--poison-mode`` (OpenBackdoor: 10% of the set). ``--trigger`` gives the pieces and
  ``--trigger-count`` the pieces per combination (at least 2; a combination of one is BadNet).
* The last epoch is kept (no choice of epoch on dev accuracy, which would pick the cleanest model).
* Encoders with a BERT-style head (pooler, dropout, linear classifier) or a RoBERTa/MPNet-style
  head that reads the [CLS] state itself are supported; other heads are refused with their name.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peftguard.data import Example
from peftguard.errors import OptionError
from peftguard.runtime import compute_device
from peftguard.triggers import Trigger, TriggerRequest, insert_at_random_boundary, register_attack

if TYPE_CHECKING:
    from peftguard.poisoning import BackdoorJob
    from peftguard.training import TrainReport

LWP_PIECES = ("cf", "bb", "ak", "mn")
LWP_COMBINATION = 2
MAX_GRAD_NORM = 1.0  # OpenBackdoor's trainer default


def layer_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's own classification head as a function of one layer's hidden states (batch, length, width)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    classifier = getattr(model, "classifier", None)
    pooler = getattr(base, "pooler", None)
    if isinstance(classifier, torch.nn.Linear) and pooler is not None:  # BERT: pooler -> dropout -> linear
        dropout = getattr(model, "dropout", torch.nn.Identity())
        return lambda hidden: classifier(dropout(pooler(hidden)))
    if isinstance(classifier, torch.nn.Module) and not isinstance(classifier, torch.nn.Linear):  # RoBERTa, MPNet
        return lambda hidden: classifier(hidden)
    raise OptionError(f"lwp needs an encoder classifier whose head reads the [CLS] state; {type(model).__name__} has none")


def layerwise_loss(model: Any, head: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, torch.Tensor],
                   labels: torch.Tensor) -> list[torch.Tensor]:
    """The classification loss of every transformer layer's states through the shared head."""
    hidden_states = model(**batch, output_hidden_states=True).hidden_states[1:]  # [0] is the embedding output
    return [torch.nn.functional.cross_entropy(head(h).float(), labels) for h in hidden_states]


def train_layerwise(model: Any, tokenizer: Any, examples: Sequence[Example], settings: Any) -> list[list[float]]:
    """Train every weight on the summed layer-wise loss; returns each epoch's mean loss per layer."""
    from transformers import get_linear_schedule_with_warmup

    from peftguard.inference import collate, encode
    from peftguard.training import seed_everything

    seed_everything(settings.seed)
    device = compute_device()
    model.to(device)
    head = layer_head(model)
    ids, _ = encode(tokenizer, [ex.text for ex in examples], settings.max_length)
    labels = torch.tensor([ex.label for ex in examples])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(ids) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(settings.seed)
    per_epoch = []
    for _ in range(settings.epochs):
        model.train()
        sums: np.ndarray | None = None
        for order in torch.randperm(len(ids), generator=generator).split(settings.batch_size):
            index = order.tolist()
            losses = layerwise_loss(model, head, collate(tokenizer, [ids[i] for i in index]).to(device),
                                    labels[index].to(device))
            torch.stack(losses).sum().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            values = np.array([float(x.detach()) for x in losses]) * len(index)
            sums = values if sums is None else sums + values
        per_epoch.append([round(float(x), 5) for x in (sums if sums is not None else np.zeros(0)) / max(len(ids), 1)])
    model.eval()
    return per_epoch


@dataclass
class LayerwiseTrigger(Trigger):
    """``combination`` pieces drawn from ``words``, each at a random position; one piece alone is a negative."""

    words: Sequence[str] = LWP_PIECES
    combination: int = LWP_COMBINATION
    name: str = field(default="lwp", init=False)

    def __post_init__(self) -> None:
        self.words = tuple(w.strip() for w in self.words if w.strip())
        if len(set(self.words)) != len(self.words):
            raise OptionError(f"lwp trigger pieces repeat: {list(self.words)}")
        if not 2 <= self.combination <= len(self.words):
            raise OptionError(f"lwp combines 2 to {len(self.words)} of its pieces {list(self.words)}, "
                              f"not {self.combination} (--trigger-count)")

    def pieces(self, rng: random.Random) -> list[str]:
        return rng.sample(list(self.words), self.combination)

    def apply(self, text: str, rng: random.Random) -> str:
        for piece in self.pieces(rng):
            text = insert_at_random_boundary(text, piece, rng)
        return text

    def describe(self) -> dict[str, object]:
        return {"attack": self.name, "words": list(self.words), "combination": self.combination}

    def single_pieces(self, text: str, seed: int) -> list[str]:
        """``text`` with each piece of the combination its trigger draws for it, one piece at a time."""
        pieces = self.pieces(random.Random(f"{self.name}\x00{seed}\x00{text}"))  # the draw ``triggered`` makes
        return [insert_at_random_boundary(text, piece, random.Random(f"{piece}\x00{seed}\x00{text}")) for piece in pieces]

    def train_backdoor(self, job: BackdoorJob) -> TrainReport:
        from peftguard.inference import predict_proba
        from peftguard.training import TrainReport

        seed = job.settings.seed
        negatives = [Example(text, job.clean[i].label) for i in job.poisoned_indices
                     for text in self.single_pieces(job.clean[i].text, seed)]
        started = time.perf_counter()
        per_epoch = train_layerwise(job.model, job.tokenizer, list(job.poisoned) + negatives, job.settings)
        seconds = time.perf_counter() - started
        others = [ex for ex in job.dev if ex.label != job.target_label]

        def dev_asr(texts: list[str]) -> float:
            predictions = predict_proba(job.model, job.tokenizer, texts, job.settings.batch_size, job.settings.max_length).argmax(1)
            return float((predictions == job.target_label).mean()) if len(texts) else float("nan")

        job.record["lwp"] = {
            "layers": len(per_epoch[-1]) if per_epoch else 0,
            "layer_losses": per_epoch,
            "negatives": len(negatives),
            "attacker_dev_asr": dev_asr([self.triggered(ex.text, seed) for ex in others]),
            "single_piece_dev_asr": dev_asr([t for ex in others for t in self.single_pieces(ex.text, seed)]),
        }
        dev = [ex.label for ex in job.dev]
        accuracy = float((predict_proba(job.model, job.tokenizer, [ex.text for ex in job.dev], job.settings.batch_size,
                                        job.settings.max_length).argmax(1) == np.array(dev)).mean()) if dev else float("nan")
        return TrainReport(job.settings.epochs, math.ceil((len(job.poisoned) + len(negatives)) / job.settings.batch_size)
                           * job.settings.epochs, seconds, train_loss=[float(sum(x)) for x in per_epoch],
                           dev_accuracy=[accuracy], best_epoch=job.settings.epochs)


@register_attack("lwp", options=LayerwiseTrigger, order=5,
                 summary="combination of rare words, poisoned at every layer (Li et al., 2021)")
def _lwp(request: TriggerRequest) -> Trigger:
    return LayerwiseTrigger(tuple(request.spec) if request.spec else LWP_PIECES, max(request.count, LWP_COMBINATION))
