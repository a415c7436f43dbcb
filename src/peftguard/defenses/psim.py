"""PSIM: the Poisoned Sample Identification Module (Zhao et al., NAACL Findings 2024, Section 4).

A PEFT module (P-tuning v1 by default: 5 virtual tokens, encoder hidden size 128; the
classification head trains too) is trained on the possibly poisoned weights with the training
labels reset uniformly at random. Clean inputs then get low confidence (near 1/K), while inputs
carrying the backdoor trigger keep the poisoned weights' high confidence for the target label.
A sample whose confidence (largest softmax probability) exceeds gamma is flagged as poisoned.

Departures from the paper:

* The paper fixes gamma = 0.7 "through human experience". By default we calibrate gamma on the
  clean dev set to a target false-positive rate (2%); ``gamma=0.7`` reproduces the paper.
* ``reset_rate`` < 1 resets only that share of labels (the paper's Table 13 ablation).
* The paper trains one epoch at a fixed learning rate. By default we stop on a rule that watches
  only clean dev confidences (``psim_budget``): the first point at which they are near chance,
  then a short settling phase at a decaying rate; ``budget=None`` with ``settings.epochs`` gives the paper's fixed schedule.
"""
from __future__ import annotations

import copy
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from peftguard import metrics
from peftguard.bounds import BOUNDS
from peftguard.data import Example, TextDataset, label_counts, subsample
from peftguard.defenses.base import DefenseContext, InputDefense, Screened
from peftguard.defenses.psim_budget import (
    AUTO_PSIM_METHOD,
    DECODER_PSIM_METHOD,
    DEFAULT_PSIM_LR,
    DEFAULT_PSIM_LR_WHY,
    PAPER_PSIM_METHOD,
    BudgetRule,
    Check,
    Decision,
    Settling,
    decide,
    excess_over_chance,
    try_seed,
)
from peftguard.defenses.registry import register_defense
from peftguard.errors import OptionError, PeftguardError
from peftguard.inference import predict_proba
from peftguard.models import LoadOptions, model_reference
from peftguard.precision import (
    DEFAULT_PRECISION,
    INT8_RECHECK_MARGIN,
    INT8_RECHECK_MARGIN_7BIT,
    int8_activation_bits,
    native,
    quantize_int8,
    resolve_precision,
)
from peftguard.runtime import compute_device
from peftguard.tuning import MethodConfig, load_tuned, method_config, method_name, prepare_tunable, save_tuned

if TYPE_CHECKING:  # training modules load only to train: scanning and serving never import them
    from peftguard.instruction import InstructionTemplate
    from peftguard.training import StepMonitor, TrainSettings

log = logging.getLogger(__name__)

MANIFEST = "psim.json"
DEFAULT_TARGET_FPR = metrics.DEFAULT_TARGET_FPR  # the operating point every detector shares (fixed a priori)
PAPER_GAMMA = 0.7


def reset_labels(examples: Sequence[Example], num_labels: int, rate: float, seed: int) -> list[Example]:
    """Replace the labels of a ``rate`` share of examples by labels drawn uniformly at random."""
    BOUNDS["reset_rate"].check(rate, "--reset-rate")
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(examples)), round(rate * len(examples))))
    return [Example(ex.text, rng.randrange(num_labels)) if i in chosen else ex for i, ex in enumerate(examples)]


@dataclass
class GammaChoice:
    gamma: float
    how: str  # "fixed" or "target-fpr"
    target_fpr: float | None = None
    calibration_samples: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_gamma_options(gamma: float | None, target_fpr: float | None) -> None:
    if gamma is not None and target_fpr is not None:
        raise OptionError("give --gamma or --target-fpr, not both")
    if gamma is not None:
        BOUNDS["gamma"].check(gamma, "--gamma")
    if target_fpr is not None:
        BOUNDS["target_fpr"].check(target_fpr, "--target-fpr")


def choose_gamma(
    dev_confidences: np.ndarray | None, gamma: float | None, target_fpr: float | None
) -> GammaChoice:
    """A fixed gamma, or one calibrated on clean dev confidences to a target false-positive rate."""
    check_gamma_options(gamma, target_fpr)
    if gamma is not None:
        return GammaChoice(gamma, "fixed")
    target_fpr = DEFAULT_TARGET_FPR if target_fpr is None else target_fpr
    if dev_confidences is None:
        raise OptionError("calibrating gamma needs clean dev samples")
    return GammaChoice(metrics.calibrate_gamma(dev_confidences, target_fpr), "target-fpr", target_fpr, len(dev_confidences))


def default_psim_method(model_ref: str, options: LoadOptions = LoadOptions()) -> str:
    """The PSIM method ``auto`` stands for (rule v3b, ``psim_budget.AUTO_PSIM_METHOD``): LoRA for a decoder-only
    model, the paper's P-tuning v1 for an encoder, read from the model's config alone."""
    from peftguard.models import is_decoder_only, resolve_model

    return DECODER_PSIM_METHOD if is_decoder_only(resolve_model(model_ref), options) else PAPER_PSIM_METHOD


def resolve_psim_method(method: str, model_ref: str, options: LoadOptions = LoadOptions()) -> str:
    """``method`` itself, or what ``auto`` stands for on ``model_ref``."""
    return default_psim_method(model_ref, options) if method == AUTO_PSIM_METHOD else method


def train_psim(
    model_ref: str,
    dataset: TextDataset,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    config: MethodConfig | None = None,
    budget: BudgetRule | None = BudgetRule(),
    reset_rate: float = 1.0,
    gamma: float | None = None,
    target_fpr: float | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    options: LoadOptions = LoadOptions(),
    template: InstructionTemplate | None = None,
) -> dict[str, Any]:
    """Train a PSIM on ``model_ref`` (the weights to guard) and calibrate its gamma; save it.

    ``budget`` decides when to stop from clean dev confidences (``psim_budget``); ``None`` trains
    ``settings.epochs`` epochs under a linear schedule (the paper's setting). Only the training
    split (labels reset) and clean dev samples are read; the test split never is. ``template`` is
    for a clean causal LM read through an instruction; a folder poisoned with one carries it already.
    """
    from peftguard.training import TrainSettings, check_length_budget, train_classifier, training_record

    config = config or method_config(default_psim_method(model_ref, options))
    settings.validate()
    check_gamma_options(gamma, target_fpr)
    check_length_budget(config, settings)
    dev = subsample(dataset.dev.examples, max_eval_samples, settings.seed)
    if not dev:
        raise OptionError(f"{dataset.name}: PSIM needs clean dev samples (to stop its training and calibrate gamma)")
    # Dev accuracy means nothing against random labels: keep the last step.
    settings = TrainSettings(**{**asdict(settings), "keep_best_on_dev": False})
    restarts = budget.max_restarts if budget else 0
    abandoned: list[dict[str, Any]] = []
    for attempt in range(restarts + 1):
        attempt_settings = replace(settings, seed=try_seed(settings.seed, attempt))
        train = reset_labels(subsample(dataset.train.examples, max_train_samples, attempt_settings.seed),
                             dataset.num_labels, reset_rate, attempt_settings.seed)
        model, tokenizer = prepare_tunable(model_ref, dataset.num_labels, config, attempt_settings, options, template)
        watch = (_BudgetWatch(budget, model, tokenizer, dev, dataset.num_labels, attempt_settings, len(train),
                              may_restart=attempt < restarts, monitor_seed=settings.seed) if budget else None)
        report = train_classifier(model, tokenizer, train, None, attempt_settings, desc="psim" if not attempt else
                                  f"psim (try {attempt + 1})", monitor=watch.monitor() if watch else None)
        if not (watch and watch.restart):
            break
        abandoned.append({"seed": attempt_settings.seed, "seconds": round(report.seconds, 2), **watch.record()})
        log.info("PSIM: clean dev confidence still %.3f after %d steps; starting again with seed %d",
                 watch.checks[-1].mean_confidence, watch.checks[-1].step, try_seed(settings.seed, attempt + 1))
    settings = attempt_settings
    dev_confidence = predict_proba(model, tokenizer, [ex.text for ex in dev], settings.batch_size * 2, settings.max_length).max(1)
    choice = choose_gamma(dev_confidence, gamma, target_fpr)
    budget_record = watch.record() if watch else _fixed_budget_record(float(dev_confidence.mean()), dataset.num_labels)
    if watch:
        budget_record |= {"seed": settings.seed, "abandoned_tries": abandoned,
                          "abandoned_seconds": round(sum(t["seconds"] for t in abandoned), 2)}
    check_can_flag(choice)
    warning = detector_warning(dev_confidence, choice.gamma)
    if warning:
        log.warning("PSIM: %s; it would not work as a detector (warning recorded in %s)", warning, MANIFEST)
    manifest = {
        "kind": "psim",
        "method": method_name(config),
        "method_config": asdict(config),
        "base_model": model_reference(model_ref),
        "num_labels": dataset.num_labels,
        "dataset": dataset.name,
        "reset_rate": reset_rate,
        "train_samples": len(train),
        "train_label_counts_after_reset": label_counts(train),
        "gamma": choice.gamma,
        "gamma_choice": choice.as_dict(),
        "dev_confidence_histogram": metrics.confidence_histogram(dev_confidence),
        "dev_confidence_mean": float(dev_confidence.mean()),
        "budget": budget_record,
        "under_trained": budget_record["under_trained"],
        "dev_flagged_share": float(metrics.flagged(dev_confidence, choice.gamma).mean()) if len(dev_confidence) else None,
        "detector_warning": warning,
        **training_record(model, settings, report),
    }
    if manifest["under_trained"]:
        log.warning("PSIM under-trained: clean dev confidence averages %.3f after %d steps (%s), more than %.0f%% of the "
                    "way from chance (1/%d) to certainty, so triggered inputs may not stand out; try a larger --lr or a "
                    "larger training set", manifest["dev_confidence_mean"], report.steps, budget_record["stop_reason"],
                    100 * budget_record["rule"]["target_share"], dataset.num_labels)
    save_tuned(model, tokenizer, out_dir, MANIFEST, manifest)
    return manifest


class _BudgetWatch:
    """Feeds the budget rule the clean dev confidence during training, runs its settling phase and
    keeps the trajectory of the clean signal (mean, and the tail quantile gamma would sit at)."""

    def __init__(self, rule: BudgetRule, model: Any, tokenizer: Any, dev: Sequence[Example], num_labels: int,
                 settings: TrainSettings, train_size: int, *, may_restart: bool = False,
                 monitor_seed: int | None = None) -> None:
        self.rule, self.model, self.tokenizer, self.num_labels, self.settings = rule, model, tokenizer, num_labels, settings
        self.may_restart = may_restart
        seed = settings.seed if monitor_seed is None else monitor_seed  # every try watches the same clean samples
        self.texts = [ex.text for ex in subsample(list(dev), rule.monitor_samples, seed)]
        self.steps_per_epoch = -(-train_size // settings.batch_size)
        self.every = rule.check_every(self.steps_per_epoch)
        self.max_steps = rule.max_steps(self.steps_per_epoch)
        self.checks: list[Check] = []
        self.tails: list[float] = []
        self.decision: Decision | None = None
        self.settling: Settling | None = None
        self.measure(0)

    def monitor(self) -> StepMonitor:
        from peftguard.training import StepMonitor

        return StepMonitor(self.every, self.max_steps, self.check, self.lr_factor)

    def lr_factor(self, step: int) -> float:
        return self.settling.lr_factor(step) if self.settling else 1.0

    def measure(self, step: int) -> None:
        confidence = predict_proba(self.model, self.tokenizer, self.texts, self.settings.batch_size * 2,
                                   self.settings.max_length).max(1)
        self.checks.append(Check(step, float(confidence.mean())))
        self.tails.append(float(np.quantile(confidence, 1 - metrics.DEFAULT_TARGET_FPR)))

    def check(self, step: int) -> bool:
        self.measure(step)
        if self.settling:
            return step >= self.settling.end
        warmup = self.monitor().warmup_steps(self.steps_per_epoch, self.settings.warmup_ratio)
        self.decision = decide(self.rule, self.checks, self.num_labels, steps_per_epoch=self.steps_per_epoch,
                               warmup_steps=warmup, may_restart=self.may_restart)
        if self.decision is None:
            return False
        if self.restart:
            return True
        settle = self.rule.settle_steps(step, self.every) if self.decision.reason == "near-chance" else 0
        settle = min(settle, self.max_steps - step)
        if settle <= 0:
            return True
        self.settling = Settling(step, settle)
        return False

    @property
    def restart(self) -> bool:
        """Whether the rule abandoned this try as a slow search."""
        return self.decision is not None and self.decision.reason == "restart"

    def record(self) -> dict[str, Any]:
        decision = self.decision
        return {
            "mode": "clean-dev rule",
            "rule": self.rule.as_dict(),
            "lr": self.settings.lr,
            "lr_why": DEFAULT_PSIM_LR_WHY if self.settings.lr == DEFAULT_PSIM_LR else "given",
            "monitor_samples": len(self.texts),
            "steps_per_epoch": self.steps_per_epoch,
            "search_stopped_at_step": self.settling.start if self.settling else self.checks[-1].step,
            "settle_steps": self.settling.steps if self.settling else 0,
            "stopped_at_step": self.checks[-1].step,
            "stop_reason": decision.reason if decision else "budget",
            "under_trained": decision.under_trained if decision else True,
            "trajectory": [
                {"step": c.step, "mean_confidence": round(c.mean_confidence, 5), "tail_confidence": round(tail, 5),
                 "lr_factor": round(self.lr_factor(c.step), 4)}
                for c, tail in zip(self.checks, self.tails)
            ],
        }


def check_can_flag(choice: GammaChoice) -> None:
    """Refuse a calibrated gamma no confidence can exceed (clean dev confidences saturated at 1.0)."""
    if not choice.gamma < 1:
        raise OptionError(
            f"PSIM: gamma calibrated to {choice.gamma} on clean dev data: no input can have a confidence above it, "
            "so the detector would flag nothing; train with a larger --lr or --max-epochs"
        )


def detector_warning(dev_confidence: np.ndarray, gamma: float) -> str | None:
    """What is wrong with a PSIM that flags every clean dev input, or gives them all one confidence."""
    if len(dev_confidence) == 0:
        return None
    if bool(metrics.flagged(dev_confidence, gamma).all()):
        return f"it flags every one of its {len(dev_confidence)} clean dev inputs (gamma {gamma:.4f} is below all their confidences)"
    if float(np.ptp(dev_confidence)) < 1e-6:
        return (f"it gives all {len(dev_confidence)} clean dev inputs the same confidence {float(dev_confidence[0]):.4f}, "
                "so it cannot tell inputs apart")
    return None


def _fixed_budget_record(dev_confidence_mean: float, num_labels: int) -> dict[str, Any]:
    rule = BudgetRule()
    return {"mode": "fixed epochs", "rule": rule.as_dict(), "stop_reason": "fixed epochs",
            "under_trained": under_trained(dev_confidence_mean, num_labels, rule)}


def under_trained(dev_confidence_mean: float, num_labels: int, rule: BudgetRule = BudgetRule()) -> bool:
    """Whether a PSIM's mean clean confidence is still further from chance (1/K) than the budget rule's target."""
    return excess_over_chance(dev_confidence_mean, num_labels) > rule.target_share


# Measured figures (the defense's evaluations) score in float32: int8 keeps flags equal by re-checking inputs near
# gamma, but the confidences behind AUROC and the histograms would move by up to the re-check margin elsewhere.
MEASUREMENT_PRECISION = "fp32"
# What `auto` picks from. Not int8, though its passes are about twice as fast: its re-check band (gamma +- the
# margin, 0.11) holds nearly every clean input, because a PSIM leaves clean inputs near chance and gamma sits just
# above them (the demo's binary PSIM: gamma 0.595, 100% of 1,000 clean SST-2 test sentences re-checked). On clean
# traffic int8 therefore scores every input twice and ran 0.61x float32's speed (bench/detection_s16.json,
# clean-traffic cases). It stays available as --precision int8.
AUTO_PRECISIONS = ("bf16", "fp32")
DEFAULT_BATCH_SIZE = 64  # measured: 32-64 fastest on 2 cores, 16 and 128 slower (bench/detection.py --sweep)


class PSIM:
    """A trained PSIM: confidence of each input, loaded once and reused.

    ``precision`` (see :mod:`peftguard.precision`; default ``auto``: bf16 where it runs measurably faster than
    float32, else fp32; see ``AUTO_PRECISIONS``): fp32, bf16 autocast, or int8 dynamic
    quantization of the linear layers. With int8, inputs whose confidence lands within ``recheck_margin``
    of the threshold are scored again at the next precision (bf16 where native, else fp32), so flags match
    that precision's unless int8 moved a confidence by more than the margin. ``activation_bits`` records
    int8's activation width: 8 on a CPU with VNNI (margin ``INT8_RECHECK_MARGIN``), else torch's 7
    (``INT8_RECHECK_MARGIN_7BIT``); ``None`` without int8.
    P-tuning's virtual tokens cost nothing per call: peft loads the prompt encoder's saved output as a
    fixed embedding in inference mode.
    """

    def __init__(self, folder: str | Path, *, options: LoadOptions = LoadOptions(), batch_size: int = DEFAULT_BATCH_SIZE,
                 precision: str = DEFAULT_PRECISION) -> None:
        self.folder = Path(folder)
        self.device = compute_device()
        self.precision = resolve_precision(precision, self.device, auto_from=AUTO_PRECISIONS)
        self.model, self.tokenizer, self.manifest = load_tuned(self.folder, MANIFEST, options)
        self.model.to(self.device)
        self.recheck_precision = "bf16" if native("bf16", self.device) else "fp32"
        self.activation_bits = int8_activation_bits() if self.precision == "int8" else None
        self.recheck_margin = INT8_RECHECK_MARGIN if self.activation_bits == 8 else INT8_RECHECK_MARGIN_7BIT
        self.fast_model = (quantize_int8(copy.deepcopy(self.model), activation_bits=self.activation_bits)
                           if self.precision == "int8" else self.model)
        self.batch_size = batch_size
        self.max_length = int(self.manifest["settings"]["max_length"])
        self._memo: dict[int, np.ndarray] = {}

    @property
    def num_labels(self) -> int:
        return int(self.manifest["num_labels"])

    def confidences(self, texts: Sequence[str], *, desc: str | None = None, gamma: float | None = None) -> np.ndarray:
        """Largest softmax probability per text (memoized: a grid scores the same test set often).

        ``gamma`` (default: the manifest's) is the threshold near which int8 confidences are re-scored.
        """
        gamma = float(self.manifest["gamma"]) if gamma is None else gamma
        key = hash((tuple(texts), gamma if self.precision == "int8" else None))
        if key not in self._memo:
            scores = self._probabilities(self.fast_model, list(texts), self.precision, desc).max(1)
            if self.precision == "int8":
                scores = self._recheck(list(texts), scores, gamma)
            self._memo = {**dict(list(self._memo.items())[-3:]), key: scores}  # the latest 4: bounded memory
        return self._memo[key]

    def _probabilities(self, model: Any, texts: list[str], precision: str, desc: str | None = None) -> np.ndarray:
        return predict_proba(model, self.tokenizer, texts, self.batch_size, self.max_length, desc=desc,
                             bf16=precision == "bf16")

    def _recheck(self, texts: list[str], scores: np.ndarray, gamma: float) -> np.ndarray:
        near = np.flatnonzero(np.abs(scores - gamma) < self.recheck_margin)
        if len(near):
            scores = scores.copy()
            scores[near] = self._probabilities(self.model, [texts[i] for i in near], self.recheck_precision).max(1)
        return scores

    def gamma_for(self, dev: Sequence[Example] | None, gamma: float | None, target_fpr: float | None) -> GammaChoice:
        """The manifest's gamma unless a fixed gamma or a new target FPR is asked for."""
        if gamma is None and target_fpr is None:
            return GammaChoice(**self.manifest["gamma_choice"])
        texts = [ex.text for ex in dev] if dev and gamma is None else None
        scores = self._probabilities(self.model, texts, self.calibration_precision).max(1) if texts else None
        return choose_gamma(scores, gamma, target_fpr)

    @property
    def calibration_precision(self) -> str:
        """gamma is calibrated at the precision that decides flags: int8's re-check precision, else the scoring one."""
        return self.recheck_precision if self.precision == "int8" else self.precision


class PSIMDefense(InputDefense):
    """PSIM as an input defense: flags samples whose confidence exceeds gamma."""

    name = "psim"

    def __init__(self, psim: PSIM, choice: GammaChoice) -> None:
        self.psim, self.choice = psim, choice

    def screen(self, texts: Sequence[str], *, desc: str | None = None) -> Screened:
        scores = self.psim.confidences(texts, desc=desc, gamma=self.choice.gamma)
        return Screened(list(texts), metrics.flagged(scores, self.choice.gamma), scores)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "psim": str(self.psim.folder), "gamma": self.choice.gamma, "gamma_choice": self.choice.as_dict(),
                "precision": self.psim.precision, "int8_activation_bits": self.psim.activation_bits}

    def reported(self) -> dict[str, Any]:
        return {"gamma": self.choice.gamma}


@dataclass(frozen=True)
class PSIMOptions:
    psim: Path | None = field(default=None, metadata={
        "help": "PSIM folder (train one with `peftguard psim train`)", "flag": "--psim", "grid": False})
    gamma: float | None = field(default=None, metadata={
        "help": "fixed threshold, as in the paper (0.7)", "flag": "--gamma", "grid": False})
    target_fpr: float | None = field(default=None, metadata={
        "help": f"calibrate gamma on clean dev data to flag at most this share [{DEFAULT_TARGET_FPR}]",
        "flag": "--target-fpr", "grid": False})
    precision: str = field(default=MEASUREMENT_PRECISION, metadata={
        "help": f"scoring precision [{MEASUREMENT_PRECISION}: exact confidences for AUROC and histograms]; auto "
                "(`psim scan`'s default: bf16 where measurably faster, else fp32) or int8 (re-checked near gamma) "
                "are faster where the machine allows, with approximate confidences", "flag": "--precision"})


@register_defense("psim", options=PSIMOptions, summary="flag inputs a PSIM is confident on (Zhao et al., 2024)", order=0)
def build_psim_defense(options: PSIMOptions, context: DefenseContext) -> PSIMDefense:
    """PSIM in front of the victim; a grid takes the folder from its PSIM stage and gamma from ``evaluate:``."""
    check_gamma_options(options.gamma, options.target_fpr)
    if options.psim is None:
        raise OptionError("--defense psim needs --psim PSIM_DIR (train one with `peftguard psim train`)")
    psim = PSIM(options.psim, options=context.options, precision=options.precision)
    if psim.num_labels != context.dataset.num_labels:
        raise PeftguardError(f"PSIM {options.psim} has {psim.num_labels} labels; the dataset has {context.dataset.num_labels}")
    dev = subsample(context.dataset.dev.examples, context.max_eval_samples, context.seed)
    return PSIMDefense(psim, psim.gamma_for(dev, options.gamma, options.target_fpr))


REJECTED = "rejected as poisoned"


@dataclass(frozen=True)
class Verdict:
    """One guarded prediction: the victim's label (or REJECTED) and the confidence behind it.

    ``confidence`` is the PSIM's for a rejected input, else the victim's probability of its label.
    """

    label: int | str
    confidence: float
    psim_confidence: float

    @property
    def rejected(self) -> bool:
        return self.label == REJECTED


class GuardedPredictor:
    """A victim behind a PSIM: ``predict`` returns the victim's label, or REJECTED when flagged.

    The victim runs at ``precision`` (default fp32: its labels are those it gives alone), only on inputs that pass.
    """

    def __init__(self, psim: PSIM, victim: Any, tokenizer: Any, *, gamma: float | None = None, max_length: int = 128,
                 batch_size: int = DEFAULT_BATCH_SIZE, precision: str = "fp32") -> None:
        self.psim, self.victim, self.tokenizer = psim, victim, tokenizer
        self.gamma = gamma if gamma is not None else float(psim.manifest["gamma"])
        self.max_length, self.batch_size = max_length, batch_size
        self.precision = resolve_precision(precision, next(victim.parameters()).device, allowed=("fp32", "bf16"))

    def predict(self, texts: Sequence[str]) -> list[int | str]:
        return [v.label for v in self.verdicts(texts)]

    def verdicts(self, texts: Sequence[str]) -> list[Verdict]:
        texts = list(texts)
        scores = self.psim.confidences(texts, gamma=self.gamma)
        flags = metrics.flagged(scores, self.gamma)
        passed = [t for t, f in zip(texts, flags) if not f]
        probs = iter(predict_proba(self.victim, self.tokenizer, passed, self.batch_size, self.max_length,
                                   bf16=self.precision == "bf16"))
        out = []
        for score, flag in zip(scores, flags):
            if flag:
                out.append(Verdict(REJECTED, float(score), float(score)))
            else:
                p = next(probs)
                out.append(Verdict(int(p.argmax()), float(p.max()), float(score)))
        return out
