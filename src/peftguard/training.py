"""Training and inference loops shared by poisoning, victim fine-tuning and PSIM.

Speed choices: texts are tokenized once (cached per tokenizer, max length and texts); batches are
padded to their longest member (dynamic padding); inference sorts by length so that each batch
holds similar lengths, then restores the input order. ``accelerate`` places the model and runs
bf16 mixed precision when a GPU is present.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from peftguard.data import Example
from peftguard.errors import OptionError
from peftguard.inference import _ENCODING_CACHE, collate, count_truncated, encode, flush_denormals, predict_proba  # noqa: F401

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    epochs: int = 2
    lr: float = 2e-5
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    keep_best_on_dev: bool = True  # restore the epoch with the best dev accuracy

    def validate(self) -> None:
        if self.epochs < 1:
            raise OptionError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise OptionError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.max_length < 8:
            raise OptionError(f"--max-length must be at least 8, got {self.max_length}")
        if not self.lr > 0:
            raise OptionError(f"--lr must be positive, got {self.lr}")


@dataclass
class TrainReport:
    epochs: int
    steps: int
    seconds: float
    train_loss: list[float] = field(default_factory=list)
    dev_accuracy: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    truncated_texts: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "train_loss": [round(x, 5) for x in self.train_loss],
            "dev_accuracy": [round(x, 5) for x in self.dev_accuracy],
            "best_epoch": self.best_epoch,
            "truncated_texts": self.truncated_texts,
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_accelerator() -> Accelerator:
    mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=mixed)


def train_classifier(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: Sequence[Example],
    dev: Sequence[Example] | None,
    settings: TrainSettings,
    *,
    desc: str = "train",
) -> TrainReport:
    """Train ``model`` (its parameters that require grad) on ``train``; keep the best dev epoch."""
    settings.validate()
    flush_denormals()
    seed_everything(settings.seed)
    accelerator = make_accelerator()
    ids, truncated = encode(tokenizer, [ex.text for ex in train], settings.max_length)
    labels = torch.tensor([ex.label for ex in train])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(ids) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(settings.seed)
    report = TrainReport(settings.epochs, total_steps, 0.0, truncated_texts=truncated)
    best_accuracy, best_state = -1.0, None
    started = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(len(ids), generator=generator).tolist()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{settings.epochs}", leave=False, unit="step")
        for step in bar:
            batch_index = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            batch = collate(tokenizer, [ids[i] for i in batch_index]).to(accelerator.device)
            with accelerator.autocast():
                loss = model(**batch, labels=labels[batch_index].to(accelerator.device)).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        report.train_loss.append(float(np.mean(losses)))
        if dev and settings.keep_best_on_dev:
            probs = predict_proba(model, tokenizer, [ex.text for ex in dev], settings.batch_size * 2, settings.max_length)
            accuracy = float((probs.argmax(1) == np.array([ex.label for ex in dev])).mean())
            report.dev_accuracy.append(accuracy)
            log.info("%s epoch %d: loss %.4f, dev accuracy %.4f", desc, epoch + 1, report.train_loss[-1], accuracy)
            if accuracy > best_accuracy:
                best_accuracy, report.best_epoch = accuracy, epoch + 1
                best_state = _snapshot_trainable(model)
    if best_state is not None and report.best_epoch != settings.epochs:
        _restore(model, best_state)
    report.seconds = time.perf_counter() - started
    model.eval()
    return report


def _snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
