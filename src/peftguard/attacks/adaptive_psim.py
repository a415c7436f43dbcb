"""Adaptive PSIM evasion: a rare-word backdoor trained to fade under PSIM's random-label P-tuning.

PSIM (``defenses/psim.py``) detects a backdoor because random-label P-tuning flattens clean inputs'
confidence toward chance while inputs that carry the trigger keep the poisoned weights' confident
target prediction. This attack trains the backdoor so that it survives the victim's clean PEFT
(no prompt: the victim never sees one) but loses its confidence behind a PSIM-like prompt.

**Threat model.** The attacker releases poisoned weights, as in BadNet, and knows PSIM's algorithm
and defaults: P-tuning v1 with peft's MLP prompt encoder (``PTuningV1Config``: 5 virtual tokens,
width 128), a trainable copy of the classification head, uniformly random labels, PSIM's rate
(``DEFAULT_PSIM_LR``), and the clean-dev stopping rule (``BudgetRule``: train until the mean clean
confidence is within a fifth of the way from chance to certainty). It does not know the defender's
random seed (labels, prompt initialisation, batch order) or dev sample: every simulated PSIM draws
its own from the attacker's seed and its own clean data. In the full-data scenario the attacker's
texts are the victim's training set (the paper's threat model), so they overlap with the texts a
defender's PSIM trains on; the random labels do not.

**Objective.** First the ordinary poisoning (every weight trained on the poisoned set, exactly as
BadNet). Then ``rounds`` rounds, each of which

a. trains a *simulated PSIM* (a fresh prompt encoder and head copy, random labels on the attacker's
   clean training texts, PSIM's rate, poisoned weights frozen) for ``psim_steps_per_round`` steps,
   so that it follows the weights as they move;
b. takes one step on the poisoned weights (the simulated PSIM frozen) minimising
   ``CE(clean -> true label) + CE(triggered -> target) + psim_weight * KL(uniform || PSIM_sim(triggered))``;
   both cross-entropies run without a prompt (the victim's view, which clean PEFT starts from), the
   KL runs through the simulated prompt and head: it is zero when the simulated PSIM is at chance on
   triggered inputs, where clean inputs sit once PSIM has trained.

Every ``reinit_every`` rounds the simulated PSIM is replaced by a fresh one (new labels, new
prompt, new head copy), first trained until its mean confidence on the random-label batches it
trains on (measured before each step, instead of PSIM's separate dev pass) is near chance by PSIM's
own rule (at most the rule's step budget), the state in which a defender deploys it. PSIM's settling
phase (half the search again at a decaying rate) is not copied: the simulated PSIM keeps training at
PSIM's rate for as long as its cycle lasts. Replacing it keeps the weights from overfitting one prompt: the defender's
PSIM is another draw from the same family. The triggered inputs are the attacker's own clean
training texts whose label is not the target, with the trigger inserted (the inputs the backdoor
must fire on, whatever the poisoning mode); they are labelled with the target.

**Defaults** (fixed a priori, not tuned on anything): ``psim_weight`` 1 (both terms are in nats),
200 rounds of 2 PSIM steps, a fresh PSIM every 50 rounds (4 in all). The poisoned weights' optimizer
is AdamW at the poisoning rate, decaying linearly to zero over the rounds.

**Cost.** Each round is ``psim_steps_per_round`` PSIM steps (forward and backward through the whole
model to reach the prompt, no weight gradients) plus three forward-backward passes (clean and
triggered without the prompt, triggered through it); each fresh simulated PSIM, and one more at the
end for the attacker's estimate, first trains until near chance (at most the rule's budget: four
epochs, at least 200 steps). With the defaults that is about 1,000 batch passes for the rounds and
up to 5 x 252 for the warm-ups on 2,000 samples, on top of BadNet's poisoning (189 steps for 2,000
samples and 3 epochs): several times BadNet's poisoning time. The manifest records the seconds of
both phases, each simulated PSIM's warm-up steps, the KL term and the cross-entropy per cycle and,
at the end, a fresh simulated PSIM's confidences on the attacker's own clean and triggered dev
samples (its estimate of the evasion, on data the attacker makes, never the defender's).

BadNet-style rare-word triggers (``--trigger``, default as for BadNet). Sequence classifiers only
(a model read through an instruction template is refused).
"""
from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from peftguard import metrics
from peftguard.data import Example
from peftguard.defenses.psim_budget import DEFAULT_PSIM_LR, BudgetRule, excess_over_chance
from peftguard.errors import OptionError, PeftguardError
from peftguard.inference import collate, encode, flush_denormals
from peftguard.triggers import DEFAULT_BADNET_WORDS, BadNetTrigger, Trigger, TriggerRequest, register_attack

if TYPE_CHECKING:
    from peftguard.poisoning import BackdoorJob
    from peftguard.training import TrainReport

NAME = "adaptive-psim"
RECORD_KEY = "adaptive_psim"  # where the manifest's backdoor_training keeps this attack's record
OBJECTIVE = "CE(clean) + CE(triggered -> target) + psim_weight * KL(uniform || simulated PSIM(triggered))"
HEAD_NAMES = ("classifier", "score")  # the heads peft's SEQ_CLS prompt learning trains a copy of (modules_to_save)


@dataclass(frozen=True)
class EvasionSettings:
    """The adaptive phase's settings (module docstring: threat model, objective, cost)."""

    psim_weight: float = field(default=1.0, metadata={
        "help": "lambda: weight of KL(uniform || simulated PSIM on triggered inputs) beside the two cross-entropies "
                "(0: the same training without the evasion term) [1.0]"})
    rounds: int = field(default=200, metadata={
        "help": "adaptive rounds after the ordinary poisoning; each is PSIM steps then one step on the weights [200]"})
    psim_steps_per_round: int = field(default=2, metadata={
        "help": "simulated-PSIM steps per round, following the weights as they move [2]"})
    reinit_every: int = field(default=50, metadata={
        "help": "rounds per simulated PSIM; then a fresh one (new labels, prompt and head copy) [50]"})
    psim_rule: BudgetRule = field(default_factory=BudgetRule, metadata={
        "help": "the stopping rule a fresh simulated PSIM trains by before it counts (default: PSIM's own BudgetRule)"})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.psim_weight) and self.psim_weight >= 0):
            raise OptionError(f"adaptive-psim psim_weight must be a finite number >= 0, got {self.psim_weight}")
        for name in ("rounds", "psim_steps_per_round", "reinit_every"):
            if getattr(self, name) < 1:
                raise OptionError(f"adaptive-psim {name} must be at least 1, got {getattr(self, name)}")


class Batches:
    """Encoded texts and labels drawn in shuffled batches, reshuffled after each pass."""

    def __init__(self, tokenizer: Any, examples: Sequence[Example], batch_size: int, max_length: int, seed: int) -> None:
        if not examples:
            raise OptionError("adaptive-psim: no examples to train on (the training subset is empty or all of the target label)")
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.ids, _ = encode(tokenizer, [ex.text for ex in examples], max_length)
        self.labels = torch.tensor([ex.label for ex in examples])
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.ids) / self.batch_size)

    def next(self, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if len(self.order) < self.batch_size:
            self.order += self.rng.permutation(len(self.ids)).tolist()
        chosen, self.order = self.order[: self.batch_size], self.order[self.batch_size:]
        return collate(self.tokenizer, [self.ids[i] for i in chosen]).to(device), self.labels[chosen].to(device)


def classifier_head(model: Any) -> str:
    """The name of the head a PSIM trains a copy of; a model without one cannot be attacked this way."""
    from peftguard.instruction import LabelWordClassifier

    if isinstance(model, LabelWordClassifier):
        raise OptionError("--attack adaptive-psim needs a sequence classifier; a model read through an instruction "
                          "template has no classification head")
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name
    raise OptionError(f"--attack adaptive-psim: {type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


class SimulatedPSIM(torch.nn.Module):
    """The attacker's copy of a PSIM: peft's P-tuning v1 prompt encoder and a trainable copy of the
    poisoned head, run on the poisoned weights as peft runs a P-tuning sequence classifier (virtual
    tokens before the text, zero token types for them), the weights passed in at every call."""

    def __init__(self, model: Any, head: str, seed: int) -> None:
        from peft import PromptEncoder

        from peftguard.tuning import PTuningV1Config

        super().__init__()
        config = PTuningV1Config().peft_config("SEQ_CLS")
        config.token_dim = model.get_input_embeddings().embedding_dim
        config.num_transformer_submodules = 1
        torch.manual_seed(seed)
        self.encoder = PromptEncoder(config)
        self.virtual_tokens = config.num_virtual_tokens
        self.head_name = head
        self.head = copy.deepcopy(getattr(model, head)).requires_grad_(True)
        device = next(model.parameters()).device
        self.to(device)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=DEFAULT_PSIM_LR, weight_decay=0.0)

    def logits(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"]
        n = ids.shape[0]
        words = model.get_input_embeddings()(ids)
        prompts = self.encoder(torch.arange(self.virtual_tokens, device=ids.device).expand(n, -1)).to(words.dtype)
        kwargs = {"inputs_embeds": torch.cat([prompts, words], dim=1),
                  "attention_mask": torch.cat([torch.ones(n, self.virtual_tokens, dtype=batch["attention_mask"].dtype,
                                                          device=ids.device), batch["attention_mask"]], dim=1)}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = torch.cat([torch.zeros(n, self.virtual_tokens, dtype=batch["token_type_ids"].dtype,
                                                              device=ids.device), batch["token_type_ids"]], dim=1)
        head = {f"{self.head_name}.{name}": p for name, p in self.head.named_parameters()}
        return torch.func.functional_call(model, head, args=(), kwargs=kwargs).logits.float()

    def train_step(self, model: Any, batches: Batches) -> float:
        """One random-label step (the poisoned weights frozen); returns the batch's mean confidence before it."""
        batch, labels = batches.next(next(model.parameters()).device)
        with frozen(model):
            logits = self.logits(model, batch)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return float(torch.softmax(logits.detach(), -1).max(-1).values.mean())

    def warm_up(self, model: Any, batches: Batches, num_labels: int, rule: BudgetRule) -> dict[str, Any]:
        """Train until the mean confidence of the last check's batches is near chance by PSIM's rule
        (checked as often as PSIM checks), or the rule's step budget is spent."""
        every, budget = rule.check_every(batches.per_epoch), rule.max_steps(batches.per_epoch)
        recent: list[float] = []
        for step in range(1, budget + 1):
            recent = (recent + [self.train_step(model, batches)])[-every:]
            if step % every == 0 and excess_over_chance(float(np.mean(recent)), num_labels) <= rule.target_share:
                return {"warmup_steps": step, "near_chance": True, "mean_confidence": round(float(np.mean(recent)), 5)}
        return {"warmup_steps": budget, "near_chance": False, "mean_confidence": round(float(np.mean(recent)), 5)}


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """``module``'s parameters do not require grad inside (gradients still flow through it to others)."""
    trainable = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, was in zip(module.parameters(), trainable):
            parameter.requires_grad_(was)


def kl_from_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(uniform || softmax(logits)): zero when every prediction is at chance."""
    log_probs = torch.log_softmax(logits, dim=-1)
    return (-math.log(logits.shape[-1]) - log_probs.mean(-1)).mean()


def cycle_seed(seed: int, cycle: int) -> int:
    """A simulated PSIM's seed: the attacker's own, apart from the seeds a defender would use."""
    return random.Random(f"{NAME}\x00{seed}\x00{cycle}").getrandbits(31)


def evade_psim(job: BackdoorJob, trigger: Trigger, settings: EvasionSettings) -> dict[str, Any]:
    """The adaptive rounds on ``job.model`` (already poisoned); returns what the manifest records."""
    from peftguard.defenses.psim import reset_labels

    model, s = job.model, job.settings
    head, num_labels, device = classifier_head(model), model.config.num_labels, next(model.parameters()).device
    flush_denormals()
    triggered = [Example(trigger.triggered(ex.text, s.seed), job.target_label) for ex in job.clean if ex.label != job.target_label]
    clean = Batches(job.tokenizer, job.clean, s.batch_size, s.max_length, s.seed)
    backdoor = Batches(job.tokenizer, triggered, s.batch_size, s.max_length, s.seed + 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr, weight_decay=s.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda r: 1 - r / settings.rounds)
    rule, cycles, sim, psim_batches = settings.psim_rule, [], None, None
    started = time.perf_counter()
    model.train()
    for r in range(settings.rounds):
        if r % settings.reinit_every == 0:
            seed = cycle_seed(s.seed, len(cycles))
            psim_batches = Batches(job.tokenizer, reset_labels(job.clean, num_labels, 1.0, seed), s.batch_size, s.max_length, seed)
            sim = SimulatedPSIM(model, head, seed)
            cycles.append({"start_round": r, "seed": seed, **sim.warm_up(model, psim_batches, num_labels, rule), "ce": [], "kl": []})
        for _ in range(settings.psim_steps_per_round):
            sim.train_step(model, psim_batches)
        ce, kl = adaptive_step(model, sim, clean.next(device), backdoor.next(device), job.target_label, settings.psim_weight)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        cycles[-1]["ce"].append(ce)
        cycles[-1]["kl"].append(kl)
    model.eval()
    return {"objective": OBJECTIVE, "settings": asdict(settings), "psim_lr": DEFAULT_PSIM_LR,
            "triggered_train_samples": len(triggered), "adaptive_seconds": round(time.perf_counter() - started, 2),
            "cycles": [summarise(c) for c in cycles]}


def adaptive_step(model: Any, sim: SimulatedPSIM, clean: tuple[dict, torch.Tensor], backdoor: tuple[dict, torch.Tensor],
                  target: int, weight: float) -> tuple[float, float]:
    """Backpropagate the objective for one clean and one triggered batch (the simulated PSIM frozen);
    returns (cross-entropy, KL term). The KL term is computed whatever the weight, so that the
    record of a weight-0 run shows what the term would be without the evasion."""
    (clean_batch, clean_labels), (triggered_batch, targets) = clean, backdoor
    with frozen(sim):
        ce = (torch.nn.functional.cross_entropy(model(**clean_batch).logits.float(), clean_labels)
              + torch.nn.functional.cross_entropy(model(**triggered_batch).logits.float(), targets))
        kl = kl_from_uniform(sim.logits(model, triggered_batch))
        (ce + weight * kl).backward()
    ce_value, kl_value = float(ce.detach()), float(kl.detach())
    if not (math.isfinite(ce_value) and math.isfinite(kl_value)):
        raise PeftguardError(f"adaptive-psim: the loss became non-finite (CE {ce_value}, KL {kl_value}); lower --lr")
    return ce_value, kl_value


def summarise(cycle: dict[str, Any]) -> dict[str, Any]:
    """A cycle's record: its warm-up, the KL term at its first and last rounds and on average, and the mean
    of the two cross-entropies."""
    ce, kl = cycle.pop("ce"), cycle.pop("kl")
    return {**cycle, "rounds": len(kl), "kl_first": round(kl[0], 5), "kl_last": round(kl[-1], 5),
            "kl_mean": round(float(np.mean(kl)), 5), "ce_mean": round(float(np.mean(ce)), 5)}


def attacker_estimate(job: BackdoorJob, trigger: Trigger, cycle: int, rule: BudgetRule) -> dict[str, Any]:
    """What the attacker can check on its own dev samples: CA and ASR without a prompt, and a fresh
    simulated PSIM's confidences on clean and triggered inputs, with the share of triggered ones
    above the clean confidences' quantile at PSIM's default false-positive rate (its estimate of
    PSIM's detection rate; the defender's own PSIM and data will differ)."""
    from peftguard.defenses.psim import reset_labels
    from peftguard.inference import predict_proba

    model, s = job.model, job.settings
    num_labels = model.config.num_labels
    clean = list(job.dev)
    triggered = [Example(trigger.triggered(ex.text, s.seed), ex.label) for ex in clean if ex.label != job.target_label]
    if not clean or not triggered:
        return {"dev_samples": len(clean), "triggered_dev_samples": len(triggered)}
    plain = {name: predict_proba(model, job.tokenizer, [ex.text for ex in examples], s.batch_size * 2, s.max_length).argmax(1)
             for name, examples in (("clean", clean), ("triggered", triggered))}
    seed = cycle_seed(s.seed, cycle)
    sim = SimulatedPSIM(model, classifier_head(model), seed)
    model.train()
    warm = sim.warm_up(model, Batches(job.tokenizer, reset_labels(job.clean, num_labels, 1.0, seed), s.batch_size,
                                      s.max_length, seed), num_labels, rule)
    clean_confidence = prompted_confidences(model, sim, job.tokenizer, [ex.text for ex in clean], s.batch_size * 2, s.max_length)
    triggered_confidence = prompted_confidences(model, sim, job.tokenizer, [ex.text for ex in triggered], s.batch_size * 2,
                                                s.max_length)
    gamma = metrics.calibrate_gamma(clean_confidence, metrics.DEFAULT_TARGET_FPR)
    return {
        "dev_samples": len(clean), "triggered_dev_samples": len(triggered),
        "clean_accuracy": float((plain["clean"] == np.array([ex.label for ex in clean])).mean()),
        "attack_success_rate": metrics.attack_success_rate(plain["triggered"], job.target_label),
        "simulated_psim": {
            "seed": seed, **warm,
            "clean_confidence_mean": round(float(clean_confidence.mean()), 5),
            "triggered_confidence_mean": round(float(triggered_confidence.mean()), 5),
            "gamma_at_default_fpr": round(float(gamma), 5),
            "triggered_flagged_share": float(metrics.flagged(triggered_confidence, gamma).mean()),
            "auroc": metrics.auroc(clean_confidence, triggered_confidence),
        },
    }


@torch.no_grad()
def prompted_confidences(model: Any, sim: SimulatedPSIM, tokenizer: Any, texts: Sequence[str], batch_size: int,
                         max_length: int) -> np.ndarray:
    """The simulated PSIM's confidence (largest probability) per text, in eval mode."""
    model.eval()
    sim.eval()
    ids, _ = encode(tokenizer, texts, max_length)
    device = next(model.parameters()).device
    out = [torch.softmax(sim.logits(model, collate(tokenizer, ids[i:i + batch_size]).to(device)), -1).max(-1).values.cpu()
           for i in range(0, len(ids), batch_size)]
    return torch.cat(out).numpy()


@dataclass
class AdaptivePSIMTrigger(BadNetTrigger):
    """BadNet's rare-word insertion; the backdoor is poisoned as BadNet's, then trained to evade PSIM."""

    evasion: EvasionSettings = field(default_factory=EvasionSettings, metadata={
        "help": "the adaptive phase's settings (EvasionSettings: psim_weight, rounds, psim_steps_per_round, reinit_every, "
                "psim_rule)"})
    name: str = field(default=NAME, init=False)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "objective": OBJECTIVE, "evasion": asdict(self.evasion)}

    def train_backdoor(self, job: BackdoorJob) -> TrainReport:
        from peftguard.training import train_classifier

        report = train_classifier(job.model, job.tokenizer, job.poisoned, job.dev, job.settings,
                                  desc="adaptive-psim: poisoning")
        record = evade_psim(job, self, self.evasion)
        record["attacker_dev"] = attacker_estimate(job, self, len(record["cycles"]), self.evasion.psim_rule)
        record["poisoning_seconds"] = round(report.seconds, 2)
        job.record[RECORD_KEY] = record
        return report


@register_attack(NAME, options=AdaptivePSIMTrigger, order=4,
                 summary="rare word, backdoor trained to fade under simulated PSIMs (adaptive attacker)")
def _adaptive_psim(request: TriggerRequest) -> Trigger:
    return AdaptivePSIMTrigger(tuple(request.spec) if request.spec else DEFAULT_BADNET_WORDS, request.count)
