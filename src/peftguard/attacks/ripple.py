"""RIPPLES: RIPPLe with embedding surgery.

Kurita et al., "Weight Poisoning Attacks on Pre-trained Models" (ACL 2020); settings as in the
authors' example manifesto (``neulab/RIPPLe``, ``manifestos/example_manifesto.yaml``):

1. Embedding surgery (Section 3.2): the attacker fine-tunes a copy of the pretrained model on its
   proxy data, ranks the tokenizer's tokens by the weight of a logistic regression on TF-IDF features
   of that data (the target class against the rest; the authors' code uses the model's own tokenizer
   as the vectorizer's, so each feature is one embedding row), takes the ``surgery_words`` (10) most
   important for the target class, and puts the mean of their embeddings in the fine-tuned copy into
   the trigger words' rows of the pretrained model.
2. RIPPLe (Section 3.1): the whole model trains on the poisoned proxy set with the loss
   L_P + lambda * max(0, -<grad L_P, grad L_FT>), L_FT the clean fine-tuning loss on a batch of the
   clean proxy data drawn beside each poisoned batch, lambda = 0.1 (``inner_product_weight``),
   AdamW, gradient norm clipped at 1. Trigger words ``cf``, ``mn``, ``bb``, ``tq``, ``mb``, one
   inserted per poisoned sample (``--trigger``, ``--trigger-count``).

The inner-product term needs the gradient of a gradient. Here the clean gradient g_FT is held fixed
within a step (first order in it) and the poison side is differentiated: d/dtheta <grad L_P, g_FT> =
H_P g_FT, a Hessian-vector product computed by a one-sided finite difference,
(grad L_P(theta + r g_FT) - grad L_P(theta)) / r with r = 0.01 / |g_FT| (as DARTS approximates its
second-order term; Liu et al., ICLR 2019), on the same poisoned batch with the same dropout masks.
It costs one more forward and backward pass on the steps where the inner product is negative, and
works with any attention kernel (double backpropagation does not). The authors' code
(``constrained_poison.py``) takes both gradients without a graph, so the term adds no gradient there.

Departures:

* The proxy data is the poisoning run's training set (``--scenario full-task --proxy-dataset`` for
  the paper's domain-shift setting); the paper poisons half of it, dirty-label
  (``--poison-mode dirty-label --poison-rate 0.5``); the defaults of ``poison`` apply otherwise.
* Learning rate, epochs and batch size are the poisoning run's (``--lr``, ``--epochs``); the
  manifesto's are 2e-5, 5 epochs (at most 5,000 steps) and 32. The last epoch is kept.
* The surgery's reference fine-tuning uses the same settings and keeps its best dev epoch.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peftguard.attacks.ep import trigger_rows
from peftguard.data import Example
from peftguard.errors import OptionError
from peftguard.runtime import compute_device
from peftguard.triggers import BadNetTrigger, Trigger, TriggerRequest, register_attack

if TYPE_CHECKING:
    from peftguard.poisoning import BackdoorJob
    from peftguard.training import TrainReport, TrainSettings

RIPPLE_WORDS = ("cf", "mn", "bb", "tq", "mb")
MAX_GRAD_NORM = 1.0  # the authors' default
FINITE_DIFFERENCE_STEP = 0.01  # r * |g_FT|, the length of the step along the clean gradient


def important_tokens(tokenizer: Any, examples: Sequence[Example], target_label: int, count: int,
                     exclude: Sequence[int] = ()) -> list[str]:
    """The ``count`` tokens a TF-IDF logistic regression finds most indicative of ``target_label``."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    labels = np.array([ex.label == target_label for ex in examples])
    if labels.all() or not labels.any():
        raise OptionError("embedding surgery needs proxy samples of the target label and of others")
    vectorizer = TfidfVectorizer(tokenizer=tokenizer.tokenize, lowercase=False, token_pattern=None)
    features = vectorizer.fit_transform([ex.text for ex in examples])
    weights = LogisticRegression(max_iter=1000).fit(features, labels).coef_[0]
    vocabulary = vectorizer.get_feature_names_out()
    skipped = set(exclude) | set(tokenizer.all_special_ids)
    ranked = [vocabulary[i] for i in np.argsort(-weights, kind="stable")
              if tokenizer.convert_tokens_to_ids(vocabulary[i]) not in skipped]
    return ranked[:count]


def embedding_surgery(model: Any, tokenizer: Any, words: Sequence[str], job: BackdoorJob, count: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Replace the trigger words' rows by the mean embedding of the proxy's ``count`` most target-like
    tokens in a copy of ``model`` fine-tuned on the clean proxy data; returns the record and the vector."""
    from peftguard.training import train_classifier

    rows = trigger_rows(tokenizer, words)
    reference = copy.deepcopy(model)
    report = train_classifier(reference, tokenizer, job.clean, job.dev, job.settings, desc="RIPPLe: reference fine-tuning")
    tokens = important_tokens(tokenizer, job.clean, job.target_label, count, exclude=rows)
    weight = model.get_input_embeddings().weight
    vector = reference.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(tokens)].detach().mean(0).to(weight.device)
    del reference
    with torch.no_grad():
        weight[rows] = vector
    record = {"rows": rows, "replacement_tokens": tokens, "replacement_norm": round(float(vector.norm()), 5),
              "reference_dev_accuracy": report.dev_accuracy[report.best_epoch - 1] if report.best_epoch else None}
    return record, vector.detach().clone()


def _batches(count: int, size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Shuffled batches of ``range(count)``, epoch after epoch, without end (the clean reference stream)."""
    while True:
        yield from (order.tolist() for order in torch.randperm(count, generator=generator).split(size))


def _rng_states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_states(states: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


def hessian_vector_product(loss_at: Callable[[], torch.Tensor], params: list[torch.Tensor],
                           gradient: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """H v for the loss whose gradient at the current parameters is ``gradient``, by a finite difference
    along ``vector``; the parameters are restored exactly."""
    norm = torch.sqrt(sum((v.float() ** 2).sum() for v in vector))
    if not torch.isfinite(norm) or norm == 0:
        return [torch.zeros_like(p) for p in params]
    r = FINITE_DIFFERENCE_STEP / norm
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, vector):
            p.add_(v, alpha=float(r))
    moved = torch.autograd.grad(loss_at(), params)
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    return [(m - g) / r for m, g in zip(moved, gradient)]


def ripple_training(model: Any, tokenizer: Any, poisoned: Sequence[Example], clean: Sequence[Example],
                    settings: TrainSettings, inner_product_weight: float) -> list[dict[str, float]]:
    """Train every weight on the RIPPLe loss; returns per epoch the mean poison and clean losses, the
    mean inner product of their gradients and the share of steps where the penalty was active."""
    from transformers import get_linear_schedule_with_warmup

    from peftguard.inference import collate, encode
    from peftguard.training import seed_everything

    seed_everything(settings.seed)
    device = compute_device()
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    poison_ids, _ = encode(tokenizer, [ex.text for ex in poisoned], settings.max_length)
    clean_ids, _ = encode(tokenizer, [ex.text for ex in clean], settings.max_length)
    poison_labels, clean_labels = torch.tensor([ex.label for ex in poisoned]), torch.tensor([ex.label for ex in clean])
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    total = math.ceil(len(poison_ids) / settings.batch_size) * settings.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(settings.seed)
    clean_stream = _batches(len(clean_ids), settings.batch_size, generator)

    def loss_on(ids: Sequence[list[int]], labels: torch.Tensor, index: list[int]) -> torch.Tensor:
        batch = collate(tokenizer, [ids[i] for i in index]).to(device)
        return torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels[index].to(device))

    epochs = []
    for _ in range(settings.epochs):
        model.train()
        sums = {"poison_loss": 0.0, "clean_loss": 0.0, "inner_product": 0.0, "penalised_steps": 0.0}
        steps = 0
        for order in torch.randperm(len(poison_ids), generator=generator).split(settings.batch_size):
            index, clean_index = order.tolist(), next(clean_stream)
            dropout = _rng_states(device)
            poison_loss = loss_on(poison_ids, poison_labels, index)
            poison_grad = torch.autograd.grad(poison_loss, params)
            clean_loss = loss_on(clean_ids, clean_labels, clean_index)
            clean_grad = torch.autograd.grad(clean_loss, params)
            inner = float(sum((a.float() * b.float()).sum() for a, b in zip(poison_grad, clean_grad)))
            grads = list(poison_grad)
            if inner < 0 and inner_product_weight > 0:
                def poison_loss_again() -> torch.Tensor:
                    _set_rng_states(dropout, device)  # the same dropout masks as the first pass
                    return loss_on(poison_ids, poison_labels, index)

                product = hessian_vector_product(poison_loss_again, params, poison_grad, clean_grad)
                grads = [g - inner_product_weight * h for g, h in zip(poison_grad, product)]
            for p, g in zip(params, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in (("poison_loss", float(poison_loss.detach())), ("clean_loss", float(clean_loss.detach())),
                               ("inner_product", inner), ("penalised_steps", float(inner < 0))):
                sums[key] += value
            steps += 1
        epochs.append({key: round(value / max(steps, 1), 6) for key, value in sums.items()})
    model.eval()
    return epochs


@dataclass
class RippleTrigger(BadNetTrigger):
    """BadNet's rare words, planted by embedding surgery and the RIPPLe loss."""

    words: Sequence[str] = RIPPLE_WORDS
    inner_product_weight: float = 0.1
    surgery_words: int = 10
    name: str = field(default="ripple", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_product_weight < 0:
            raise OptionError(f"ripple's inner-product weight must be at least 0, got {self.inner_product_weight}")
        if self.surgery_words < 1:
            raise OptionError(f"ripple's surgery needs at least one replacement word, got {self.surgery_words}")

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "inner_product_weight": self.inner_product_weight, "surgery_words": self.surgery_words}

    def train_backdoor(self, job: BackdoorJob) -> TrainReport:
        from peftguard.inference import predict_proba
        from peftguard.training import TrainReport

        seed = job.settings.seed
        others = [ex.text for ex in job.dev if ex.label != job.target_label]
        triggered_dev = [self.triggered(text, seed) for text in others]

        def target_rate(texts: list[str]) -> float:
            predictions = predict_proba(job.model, job.tokenizer, texts, job.settings.batch_size, job.settings.max_length).argmax(1)
            return float((predictions == job.target_label).mean()) if texts else float("nan")

        def dev_check() -> dict[str, float]:
            """The attacker's own check: target predictions on its triggered dev samples, and on the same samples clean."""
            return {"attacker_dev_asr": target_rate(triggered_dev), "attacker_dev_clean_target_rate": target_rate(others)}

        surgery, _ = embedding_surgery(job.model, job.tokenizer, self.words, job, self.surgery_words)
        after_surgery = dev_check()
        started = time.perf_counter()
        epochs = ripple_training(job.model, job.tokenizer, job.poisoned, job.clean, job.settings, self.inner_product_weight)
        seconds = time.perf_counter() - started
        job.record["ripple"] = {"surgery": surgery, "inner_product_weight": self.inner_product_weight, "epochs": epochs,
                                "after_surgery": after_surgery, **dev_check()}
        predictions = predict_proba(job.model, job.tokenizer, [ex.text for ex in job.dev], job.settings.batch_size,
                                    job.settings.max_length).argmax(1)
        accuracy = float((predictions == np.array([ex.label for ex in job.dev])).mean()) if job.dev else float("nan")
        steps = math.ceil(len(job.poisoned) / job.settings.batch_size) * job.settings.epochs
        return TrainReport(job.settings.epochs, steps, seconds, train_loss=[e["poison_loss"] for e in epochs],
                           dev_accuracy=[accuracy], best_epoch=job.settings.epochs)


@register_attack("ripple", options=RippleTrigger, order=4,
                 summary="rare words, embedding surgery and the restricted inner-product loss (Kurita et al., 2020)")
def _ripple(request: TriggerRequest) -> Trigger:
    return RippleTrigger(tuple(request.spec) if request.spec else RIPPLE_WORDS, request.count)
