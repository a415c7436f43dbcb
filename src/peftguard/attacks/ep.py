"""EP: embedding poisoning, a backdoor in one word-embedding row.

Yang et al., "Be Careful about Poisoned Word Embeddings: Exploring the Vulnerability of the
Embedding Layers in NLP Models" (NAACL 2021); settings as in OpenBackdoor's ``EPTrainer``: the
attacker fine-tunes the model on clean data (the model it releases), then trains only the trigger
word's embedding row on triggered samples labelled with the target (learning rate 1e-2, 5 epochs,
the row's norm kept, so the row does not stand out by its length). Every other weight is the clean
model's. PEFT freezes word embeddings, so the backdoor should survive every PEFT method.

Departures:

* The paper and OpenBackdoor use one trigger word ``mb``; the words are the BadNet ones given with
  ``--trigger`` (default as for BadNet). A word that the tokenizer splits trains every piece's row.
* The paper's rate moves a row very little on a small model. The attacker checks the backdoor on its
  own triggered dev samples and, while their attack success rate is under ``min_asr``, trains again
  at ten times the rate (at most ``lr_escalations`` times); the rate used is recorded. This is the
  attacker's own check on data the attacker makes, not the defender's.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peftguard.data import Example
from peftguard.errors import OptionError
from peftguard.inference import collate, encode, predict_proba
from peftguard.triggers import DEFAULT_BADNET_WORDS, BadNetTrigger, Trigger, TriggerRequest, register_attack

if TYPE_CHECKING:
    from peftguard.poisoning import BackdoorJob
    from peftguard.training import TrainReport


@dataclass(frozen=True)
class RowTraining:
    lr: float = 1e-2
    epochs: int = 5
    min_asr: float = 0.9
    lr_escalations: int = 2
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0


def trigger_rows(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The embedding rows of the trigger words (every piece of a word the tokenizer splits)."""
    rows = sorted({i for word in words for i in tokenizer(word, add_special_tokens=False)["input_ids"]})
    if not rows:
        raise OptionError(f"the trigger words {list(words)} have no tokens in this tokenizer")
    return rows


def train_rows(model: Any, tokenizer: Any, examples: Sequence[Example], rows: list[int], lr: float,
               settings: RowTraining) -> list[float]:
    """Train only ``rows`` of the word embeddings on ``examples`` (plain gradient steps, norms kept);
    returns the mean loss per epoch."""
    weight = model.get_input_embeddings().weight
    norms = weight[rows].detach().norm(dim=1, keepdim=True)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    weight.requires_grad_(True)
    rng = np.random.default_rng(settings.seed)
    losses = []
    model.train()
    try:
        for _ in range(settings.epochs):
            order, total = rng.permutation(len(examples)), 0.0
            for start in range(0, len(order), settings.batch_size):
                batch = [examples[i] for i in order[start:start + settings.batch_size]]
                ids, _ = encode(tokenizer, [ex.text for ex in batch], settings.max_length)
                logits = model(**collate(tokenizer, ids).to(weight.device)).logits
                labels = torch.tensor([ex.label for ex in batch], device=weight.device)
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                weight.grad = None
                loss.backward()
                with torch.no_grad():
                    weight[rows] -= lr * weight.grad[rows]
                    weight[rows] *= norms / weight[rows].norm(dim=1, keepdim=True)
                total += float(loss.detach()) * len(batch)
            losses.append(total / max(len(examples), 1))
    finally:
        weight.grad = None
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable[name])
        model.eval()
    return losses


def poison_rows(model: Any, tokenizer: Any, words: Sequence[str], poisoned: Sequence[Example],
                triggered_dev: Sequence[Example], target_label: int, settings: RowTraining = RowTraining()) -> dict[str, Any]:
    """Train the trigger rows, raising the rate tenfold while the attacker's dev ASR is under ``min_asr``."""
    rows = trigger_rows(tokenizer, words)
    start = model.get_input_embeddings().weight[rows].detach().clone()
    record: dict[str, Any] = {"rows": rows, "tries": []}
    for step in range(settings.lr_escalations + 1):
        lr = settings.lr * 10**step
        with torch.no_grad():
            model.get_input_embeddings().weight[rows] = start
        losses = train_rows(model, tokenizer, poisoned, rows, lr, settings)
        predictions = predict_proba(model, tokenizer, [ex.text for ex in triggered_dev], settings.batch_size,
                                    settings.max_length).argmax(1)
        asr = float((predictions == target_label).mean()) if len(predictions) else float("nan")
        record["tries"].append({"lr": lr, "losses": [round(x, 5) for x in losses], "attacker_dev_asr": asr})
        if asr >= settings.min_asr:
            break
    record["lr"] = record["tries"][-1]["lr"]
    return record


@dataclass
class EmbeddingPoisoningTrigger(BadNetTrigger):
    """BadNet's rare-word insertion, with the backdoor trained into the trigger rows alone."""

    name: str = field(default="ep", init=False)

    def train_backdoor(self, job: BackdoorJob) -> TrainReport:
        from peftguard.training import train_classifier

        report = train_classifier(job.model, job.tokenizer, job.clean, job.dev, job.settings, desc="EP: clean fine-tuning")
        seed = job.settings.seed
        triggered_dev = [Example(self.triggered(ex.text, seed), job.target_label) for ex in job.dev if ex.label != job.target_label]
        rows = RowTraining(batch_size=job.settings.batch_size, max_length=job.settings.max_length, seed=seed)
        job.record["ep"] = poison_rows(job.model, job.tokenizer, self.words, [job.poisoned[i] for i in job.poisoned_indices],
                                       triggered_dev, job.target_label, rows)
        return report


@register_attack("ep", options=EmbeddingPoisoningTrigger, order=3,
                 summary="rare word whose embedding row alone carries the backdoor (Yang et al., 2021)")
def _ep(request: TriggerRequest) -> Trigger:
    return EmbeddingPoisoningTrigger(tuple(request.spec) if request.spec else DEFAULT_BADNET_WORDS, request.count)
