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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from peftguard.bounds import BOUNDS, flag
from peftguard.data import Example
from peftguard.errors import OptionError, PeftguardError
from peftguard.inference import _ENCODING_CACHE, collate, count_truncated, encode, flush_denormals, predict_proba  # noqa: F401
from peftguard.provenance import device_description, versions

if TYPE_CHECKING:
    from peftguard.methods import MethodConfig

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
        """Each setting against its range in :data:`peftguard.bounds.BOUNDS` (finite, integer where meant)."""
        for name in ("epochs", "lr", "batch_size", "max_length", "seed", "weight_decay", "warmup_ratio"):
            BOUNDS[name].check(getattr(self, name), flag(name))


@dataclass(frozen=True)
class StepMonitor:
    """Open-ended training: ``check(step)`` called every ``every`` steps (True stops training), at
    most ``max_steps`` steps, and after warmup a learning rate of ``lr * lr_factor(step)`` (constant
    when None; the factor may change as checks come in, e.g. to decay once a target is reached)."""

    every: int
    max_steps: int
    check: Callable[[int], bool]
    lr_factor: Callable[[int], float] | None = None

    def warmup_steps(self, steps_per_epoch: int, warmup_ratio: float) -> int:
        """Warmup as a share of one epoch: the total is not known in advance."""
        return int(warmup_ratio * steps_per_epoch)


@dataclass
class TrainReport:
    epochs: int
    steps: int
    seconds: float
    train_loss: list[float] = field(default_factory=list)
    dev_accuracy: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    truncated_texts: int = 0
    stopped_at_step: int | None = None  # open-ended (monitored) training only

    def as_dict(self) -> dict[str, object]:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "stopped_at_step": self.stopped_at_step,
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
    monitor: StepMonitor | None = None,
) -> TrainReport:
    """Train ``model`` (its parameters that require grad) on ``train``; keep the best dev epoch.

    Without a ``monitor`` it runs ``settings.epochs`` epochs under a linear schedule; with one it
    runs at a constant rate until the monitor says stop or ``monitor.max_steps`` is reached.
    """
    settings.validate()
    flush_denormals()
    seed_everything(settings.seed)
    accelerator = make_accelerator()
    ids, truncated = encode(tokenizer, [ex.text for ex in train], settings.max_length)
    labels = torch.tensor([ex.label for ex in train])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(ids) / settings.batch_size)
    if monitor is None:
        total_steps = steps_per_epoch * settings.epochs
        scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    else:
        total_steps = monitor.max_steps
        scheduler = _monitored_schedule(optimizer, monitor, monitor.warmup_steps(steps_per_epoch, settings.warmup_ratio))
    epochs = math.ceil(total_steps / steps_per_epoch)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(settings.seed)
    report = TrainReport(epochs, total_steps, 0.0, truncated_texts=truncated)
    best_accuracy, best_state = -1.0, None
    started, step, stop = time.perf_counter(), 0, False
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(ids), generator=generator).tolist()
        losses = []
        bar = tqdm(range(min(steps_per_epoch, total_steps - step)), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                   leave=False, unit="step")
        for batch_step in bar:
            batch_index = order[batch_step * settings.batch_size : (batch_step + 1) * settings.batch_size]
            batch = collate(tokenizer, [ids[i] for i in batch_index]).to(accelerator.device)
            with accelerator.autocast():
                loss = model(**batch, labels=labels[batch_index].to(accelerator.device)).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise PeftguardError(f"{desc}: the training loss became {losses[-1]} at epoch {epoch + 1}, step {step + 1}; "
                                     f"the model diverged and is not saved (lower --lr, now {settings.lr:g})")
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            step += 1
            if monitor is not None and (step % monitor.every == 0 or step == total_steps):
                stop = monitor.check(step)
                model.train()
                if stop:
                    break
        report.train_loss.append(float(np.mean(losses)))
        if dev and settings.keep_best_on_dev:
            probs = predict_proba(model, tokenizer, [ex.text for ex in dev], settings.batch_size * 2, settings.max_length)
            accuracy = float((probs.argmax(1) == np.array([ex.label for ex in dev])).mean())
            report.dev_accuracy.append(accuracy)
            log.info("%s epoch %d: loss %.4f, dev accuracy %.4f", desc, epoch + 1, report.train_loss[-1], accuracy)
            if accuracy > best_accuracy:
                best_accuracy, report.best_epoch = accuracy, epoch + 1
                best_state = _snapshot_trainable(model)
        if stop or step >= total_steps:
            break
    if monitor is not None:
        report.epochs, report.steps, report.stopped_at_step = epoch + 1, step, step
    if best_state is not None and report.best_epoch != report.epochs:
        _restore(model, best_state)
    report.seconds = time.perf_counter() - started
    model.eval()
    return report


def _monitored_schedule(optimizer: torch.optim.Optimizer, monitor: StepMonitor, warmup: int) -> LambdaLR:
    """Linear warmup, then the monitor's factor (as transformers' constant schedule with warmup when it has none)."""
    after = monitor.lr_factor or (lambda step: 1.0)
    return LambdaLR(optimizer, lambda step: step / max(1, warmup) if step < warmup else after(step))


def _snapshot_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def training_record(model: Any, settings: TrainSettings, report: TrainReport) -> dict[str, Any]:
    """The manifest fields every trained artifact shares: settings, training curve, provenance."""
    from peftguard.tuning import trainable_share

    trainable, total = trainable_share(model)
    return {
        "seed": settings.seed,
        "settings": asdict(settings),
        "training": report.as_dict(),
        "parameters": {"trainable": trainable, "total": total},
        "device": device_description(),
        "versions": versions(),
    }


def check_length_budget(config: MethodConfig, settings: TrainSettings) -> None:
    """Refuse a --max-length that leaves no room for text after the method's virtual tokens."""
    if settings.max_length <= config.virtual_tokens + 2:
        raise OptionError(
            f"--max-length {settings.max_length} leaves no room for text after "
            f"{config.virtual_tokens} virtual tokens"
        )
