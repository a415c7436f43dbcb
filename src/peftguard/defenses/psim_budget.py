"""PSIM's training budget, chosen from the suspect weights and clean data alone.

PSIM works when its random-label training has flattened the clean inputs' confidence toward
chance (1/K) while the backdoor, which the random labels never touch, keeps triggered inputs
confident. Too little training leaves clean inputs confident (they hide the triggered ones); too
much lets the PSIM erase the backdoor as well. A defender has no triggered inputs to find the
point between, so the rule watches only clean ones:

* train at a constant learning rate (after a short warmup), and every 1/8 epoch measure the mean
  confidence of a fixed set of clean **dev** samples (never test, never triggered);
* **stop at the first check** where that mean is within ``target_share`` of the way from chance to
  certainty (two classes: 0.6; four: 0.4): the earliest point at which clean inputs no longer
  stand out, so the backdoor has had the fewest steps in which to fade;
* stop early when the clean signal is **flat** (it fell less than ``flat_tolerance`` over the last
  ``flat_patience`` checks, and over at least ``flat_min_window`` steps) after at least one epoch
  and ``flat_min_steps`` steps: more steps at this rate will not get there (the step floors keep a
  small training set, whose checks are a few steps apart, from calling a slow descent flat);
* never stop during the warmup; give up at ``max_epochs`` epochs (at least ``min_budget_steps``
  steps for small training sets);
* after a near-chance stop, **settle**: train ``settle_share`` times as many steps again (a whole
  number of checks) while the learning rate falls linearly to zero, then stop. The search phase
  ends mid-flight at a constant rate, where each minibatch of random labels still moves every
  clean confidence; the calibrated gamma is a tail quantile of those confidences, so that noise
  raises it and hides triggered inputs. Decaying the rate is the paper's own schedule shape
  (linear decay), applied once the budget is known.

* (candidate v4, off unless ``max_restarts`` is set) **restart a slow search**: when the clean signal is still
  above the target at a check ``slow_after`` steps in or later (one epoch, at least ``flat_min_steps``), discard the try
  and start again with another seed (another training subset, label reset, initialisation and order), at most
  ``max_restarts`` times; the last try runs to the end under the rule above. On AG News the PSIMs whose search
  needed more than one epoch missed the backdoor and those that needed less caught it (REPRODUCTION.md, "Run to
  run"): the same suspect model is a lucky or unlucky draw, and a slow draw is visible on clean data alone.

Stopping anywhere but near chance leaves the PSIM ``under_trained``: it is saved, flagged in
``psim.json`` and warned about. The constants are fixed a priori (a fifth of the way from chance,
half as many settling steps again, four epochs, eight checks an epoch). Two development cells were
used to check the rule, MiniLM / SST-2 / BadNet seed 0 (``configs/psim_budget_dev.yaml``) and
MiniLM / AG News / BadNet seed 0 (``configs/psim_budget_dev_agnews.yaml``: the first rule, which
stopped without settling, failed it, and the settling phase is the answer to that failure); every
other cell validates it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from peftguard.errors import OptionError

StopReason = Literal["near-chance", "flat", "budget", "restart"]

# The PSIM's PEFT method when none is given (rule v3b): ``auto`` picks a LoRA PSIM for a decoder-only model and the
# paper's P-tuning v1 for an encoder (``peftguard.defenses.psim.default_psim_method``). P-tuning v1 prepends fresh
# virtual tokens to every input; in front of a decoder's whole input they moved what the suspect weights see before
# the first random-label step, and the P-tuning v1 PSIM missed a third or more of SmolLM2's backdoor where a LoRA
# PSIM, which starts exactly at the suspect weights, did not. On encoders neither method dominated, so the paper's
# stays. Chosen on development cells, validated on a fresh one (REPRODUCTION.md, "PSIM v3 candidate").
AUTO_PSIM_METHOD = "auto"
PAPER_PSIM_METHOD = "ptuning-v1"
DECODER_PSIM_METHOD = "lora"

# The rule's constant learning rate (P-tuning v1 and LoRA PSIMs); see DEFAULT_PSIM_LR_WHY.
DEFAULT_PSIM_LR = 3e-4
DEFAULT_PSIM_LR_WHY = (
    "constant rate of the budget rule; checked on the development cell's clean dev confidences only "
    "(configs/psim_budget_dev.yaml)"
)


@dataclass(frozen=True)
class BudgetRule:
    """The clean-data-only stopping rule (see the module docstring)."""

    target_share: float = 0.2
    settle_share: float = 0.5
    max_epochs: int = 4
    min_budget_steps: int = 200
    checks_per_epoch: int = 8
    flat_patience: int = 3
    flat_tolerance: float = 0.01
    flat_min_window: int = 24
    flat_min_steps: int = 64
    monitor_samples: int = 256
    max_restarts: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.target_share < 1:
            raise OptionError(f"budget target share must be in (0, 1), got {self.target_share}")
        if not 0 <= self.settle_share <= 4:
            raise OptionError(f"budget settle share must be in [0, 4], got {self.settle_share}")
        if self.max_restarts < 0:
            raise OptionError(f"budget max_restarts must be at least 0, got {self.max_restarts}")
        for name in ("max_epochs", "checks_per_epoch", "flat_patience", "monitor_samples"):
            if getattr(self, name) < 1:
                raise OptionError(f"budget {name} must be at least 1, got {getattr(self, name)}")

    def max_steps(self, steps_per_epoch: int) -> int:
        return max(self.max_epochs * steps_per_epoch, self.min_budget_steps)

    def slow_after(self, steps_per_epoch: int) -> int:
        """A search still above the target at a check this many steps in or later is slow: restarted while it may,
        else stopped once its clean signal is flat (before this, neither is judged)."""
        return max(steps_per_epoch, self.flat_min_steps)

    def check_every(self, steps_per_epoch: int) -> int:
        return max(1, math.ceil(steps_per_epoch / self.checks_per_epoch))

    def settle_steps(self, search_steps: int, every: int) -> int:
        """Steps of the settling phase after a search that reached chance in ``search_steps``: whole checks."""
        return every * math.ceil(self.settle_share * search_steps / every)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Restart k of a PSIM with seed s uses seed s + k * RESTART_SEED_STRIDE: far from the seeds grids give neighbouring cells.
RESTART_SEED_STRIDE = 1000


def try_seed(seed: int, attempt: int) -> int:
    """The seed of a PSIM's ``attempt``-th try (0: its own)."""
    return (seed + RESTART_SEED_STRIDE * attempt) % 2**32


@dataclass(frozen=True)
class Settling:
    """The settling phase: the rate falls linearly from its constant value to zero over ``steps``."""

    start: int
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps

    def lr_factor(self, step: int) -> float:
        """The multiplier of the constant rate after ``step`` optimizer steps."""
        if step <= self.start:
            return 1.0
        return max(0.0, (self.end - step) / self.steps)


@dataclass(frozen=True)
class Check:
    step: int
    mean_confidence: float

    def excess(self, num_labels: int) -> float:
        """How far the mean clean confidence is from chance, as a share of the way to certainty."""
        return excess_over_chance(self.mean_confidence, num_labels)


@dataclass(frozen=True)
class Decision:
    reason: StopReason
    under_trained: bool


def excess_over_chance(mean_confidence: float, num_labels: int) -> float:
    chance = 1 / num_labels
    return (mean_confidence - chance) / (1 - chance)


def decide(
    rule: BudgetRule, checks: Sequence[Check], num_labels: int, *, steps_per_epoch: int, warmup_steps: int,
    may_restart: bool = False,
) -> Decision | None:
    """Whether to stop after the latest check, and why; None to go on training. ``may_restart``: this try may be
    abandoned for another (restarts remain)."""
    if not checks:
        return None
    latest = checks[-1]
    near_chance = latest.excess(num_labels) <= rule.target_share
    if latest.step >= rule.max_steps(steps_per_epoch):
        return Decision("budget", under_trained=not near_chance)
    if latest.step <= warmup_steps:
        return None
    if near_chance:
        return Decision("near-chance", under_trained=False)
    if may_restart and latest.step >= rule.slow_after(steps_per_epoch):
        return Decision("restart", under_trained=True)
    if latest.step >= rule.slow_after(steps_per_epoch) and _flat(rule, checks, num_labels):
        return Decision("flat", under_trained=True)
    return None


def _flat(rule: BudgetRule, checks: Sequence[Check], num_labels: int) -> bool:
    """Whether the clean signal fell less than the tolerance over the window (patience checks, or more steps)."""
    latest = checks[-1]
    window_start = [c for c in checks[:-rule.flat_patience] if latest.step - c.step >= rule.flat_min_window]
    if not window_start:
        return False
    before = window_start[-1]
    best_since = min(c.excess(num_labels) for c in checks if c.step > before.step)
    return before.excess(num_labels) - best_since < rule.flat_tolerance
