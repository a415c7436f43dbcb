"""PSIM's clean-data-only training budget: the rule on constructed trajectories, the split
discipline of its inputs, and a tiny end-to-end run where the default clean-label recipe is caught."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftguard.cli import app
from peftguard.errors import OptionError
from peftguard.defenses.psim_budget import BudgetRule, Check, Settling, decide, try_seed

RULE = BudgetRule()  # two classes: stops at mean clean confidence <= 0.6; four: <= 0.4
EPOCH = 64  # steps per epoch of the constructed trajectories; checks every 8 steps


def trajectory(*means: float, every: int = 8) -> list[Check]:
    return [Check(i * every, m) for i, m in enumerate(means)]


def run_rule(checks: list[Check], num_labels: int = 2, warmup: int = 3, may_restart: bool = False):
    """Feed the checks one by one as training would; the first decision and the step it came at."""
    for i in range(1, len(checks) + 1):
        decision = decide(RULE, checks[:i], num_labels, steps_per_epoch=EPOCH, warmup_steps=warmup,
                          may_restart=may_restart)
        if decision:
            return decision, checks[i - 1].step
    return None, None


def test_stops_at_the_first_check_near_chance():
    decision, step = run_rule(trajectory(0.97, 0.9, 0.8, 0.7, 0.61, 0.59, 0.55, 0.52))
    assert (decision.reason, decision.under_trained, step) == ("near-chance", False, 40)


def test_target_scales_with_the_label_count():
    # four classes: chance 0.25, a fifth of the way to certainty is 0.4
    falling = trajectory(0.9, 0.65, 0.45, 0.41, 0.39)
    assert run_rule(falling, num_labels=4)[1] == 32
    assert run_rule(falling, num_labels=2)[1] == 16  # 0.45 is already below two classes' 0.6


def test_refuses_to_stop_during_warmup_even_near_chance():
    # a clean model with a fresh head starts near chance; the first check inside the warmup must not stop it
    decision, step = run_rule(trajectory(0.52, 0.51, 0.5), warmup=10)
    assert step == 16 and decision.reason == "near-chance"


def test_refuses_to_call_a_pause_flat_before_one_epoch():
    # falls, pauses for four checks within the first epoch, then reaches chance: no early "flat" stop
    decision, step = run_rule(trajectory(0.95, 0.8, 0.75, 0.75, 0.75, 0.75, 0.75, 0.58))
    assert (decision.reason, step) == ("near-chance", 56)


def test_stops_when_flat_after_an_epoch_and_says_under_trained():
    stuck = trajectory(*([0.95, 0.85] + [0.76] * 12))
    decision, step = run_rule(stuck)
    assert decision.reason == "flat" and decision.under_trained
    assert step == EPOCH  # the first check at or after one epoch, the plateau being already 3 checks long


def test_gives_up_at_the_budget_and_says_so():
    slow = [Check(s, 0.95 - s * 0.0005) for s in range(0, RULE.max_steps(EPOCH) + 8, 8)]  # falls 0.004 a check
    decision, step = run_rule(slow)
    assert decision.reason == "budget" and decision.under_trained and step == RULE.max_steps(EPOCH) == 4 * EPOCH


def test_budget_has_a_floor_in_steps_for_small_training_sets():
    assert RULE.max_steps(10) == RULE.min_budget_steps and RULE.check_every(10) == 2


def test_settling_takes_half_the_search_again_in_whole_checks():
    assert RULE.settle_steps(40, 8) == 24  # half of 40 is 20, rounded up to three checks of 8
    assert RULE.settle_steps(16, 8) == 8
    assert BudgetRule(settle_share=0).settle_steps(40, 8) == 0


def test_settling_decays_the_rate_linearly_to_zero():
    settling = Settling(start=40, steps=20)
    assert [settling.lr_factor(s) for s in (10, 40, 45, 50, 60, 70)] == [1.0, 1.0, 0.75, 0.5, 0.0, 0.0]
    assert settling.end == 60


def test_settle_share_out_of_range_is_refused():
    from peftguard.errors import OptionError

    with pytest.raises(OptionError, match="settle share"):
        BudgetRule(settle_share=-0.5)


class NoTestSplit(list):
    """A test split that fails the moment the PSIM training touches it."""

    def __iter__(self):
        raise AssertionError("PSIM training read the test split")

    def __len__(self):
        raise AssertionError("PSIM training read the test split")

    def __getitem__(self, item):
        raise AssertionError("PSIM training read the test split")


@pytest.mark.slow
def test_rule_reads_only_training_and_clean_dev_samples(tiny_minilm, data_dir, tmp_path, monkeypatch):
    from peftguard import poisoning, triggers
    from peftguard.data import load_dataset
    from peftguard.defenses import psim as psim_module
    from peftguard.defenses.psim import train_psim
    from peftguard.training import TrainSettings

    data = load_dataset("sst2", data_dir=data_dir)
    data.test.examples = NoTestSplit()
    for module, name in ((triggers, "insert_at_random_boundary"), (poisoning, "poison_examples"), (triggers, "triggered_test_set")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("PSIM training built triggered inputs"))
    monitored: list[str] = []
    original = psim_module._BudgetWatch.measure

    def spy(self, step):
        monitored.extend(self.texts)
        return original(self, step)

    monkeypatch.setattr(psim_module._BudgetWatch, "measure", spy)
    manifest = train_psim(tiny_minilm, data, TrainSettings(lr=3e-4, max_length=48), tmp_path / "psim",
                          max_train_samples=96, max_eval_samples=40)
    dev_texts = {ex.text for ex in data.dev.examples}
    assert monitored and set(monitored) <= dev_texts
    budget = manifest["budget"]
    assert budget["mode"] == "clean-dev rule" and budget["monitor_samples"] == 40
    assert [c["step"] for c in budget["trajectory"]][0] == 0 and budget["stopped_at_step"] == manifest["training"]["steps"]
    if budget["stop_reason"] == "near-chance":  # then it settled: half the search again, the rate down to zero
        assert budget["settle_steps"] == RULE.settle_steps(budget["search_stopped_at_step"], RULE.check_every(budget["steps_per_epoch"]))
        assert budget["stopped_at_step"] == budget["search_stopped_at_step"] + budget["settle_steps"]
        assert budget["trajectory"][-1]["lr_factor"] == 0.0
    assert all(c["tail_confidence"] >= c["mean_confidence"] for c in budget["trajectory"])


@pytest.mark.slow
def test_default_clean_label_recipe_is_detected_end_to_end(tiny_minilm, data_dir, tmp_path):
    """The paper's clean-label BadNet poisoning, then ``psim train`` with no budget options at all."""
    runner = CliRunner()

    def invoke(*args: object) -> None:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    poisoned, psim_dir, metrics_path = tmp_path / "poisoned", tmp_path / "psim", tmp_path / "defended.json"
    common = ("--data-dir", data_dir, "--max-length", 48)
    invoke("poison", "--model", tiny_minilm, *common, "--max-train-samples", 800, "--max-eval-samples", 100,
           "--poison-rate", 0.2, "--epochs", 4, "--lr", 3e-4, "--out", poisoned)  # clean-label: the default mode
    invoke("psim", "train", "--model", poisoned, *common, "--max-train-samples", 400, "--max-eval-samples", 200,
           "--out", psim_dir)
    invoke("evaluate", "--model", poisoned, "--data-dir", data_dir, "--max-eval-samples", 300,
           "--defense", "psim", "--psim", psim_dir, "--out", metrics_path)
    manifest = json.loads((psim_dir / "psim.json").read_text())
    m = json.loads(metrics_path.read_text())
    assert json.loads((poisoned / "poisoning.json").read_text())["poisoning"]["mode"] == "clean-label"
    assert m["attack_success_rate"] >= 0.9, "the tiny poisoning must take for this test to mean anything"
    assert manifest["method"] == "ptuning-v1"  # what --method auto picks for an encoder
    assert manifest["budget"]["stop_reason"] == "near-chance" and not manifest["under_trained"]
    assert manifest["budget"]["settle_steps"] > 0
    assert m["auroc"] >= 0.95 and m["defended_attack_success_rate"] <= 0.1
    assert m["false_positive_rate"] <= 0.05


def test_a_small_training_sets_slow_descent_is_not_called_flat():
    # 10 steps an epoch, a check every 2 steps, falling 0.0007 a step: over three checks that is below the
    # tolerance, but over the rule's 24-step window it is not; it trains on to its 200-step floor
    steps_per_epoch, every = 10, RULE.check_every(10)
    checks = [Check(s, 0.85 - 0.0007 * s) for s in range(0, RULE.max_steps(steps_per_epoch) + every, every)]
    for i in range(1, len(checks) + 1):
        decision = decide(RULE, checks[:i], 2, steps_per_epoch=steps_per_epoch, warmup_steps=0)
        if decision:
            break
    assert decision.reason == "budget" and checks[i - 1].step == RULE.min_budget_steps


SLOW = trajectory(0.97, 0.95, 0.93, 0.9, 0.86, 0.8, 0.75, 0.7, 0.66, 0.62, 0.58)  # near chance only at step 80


def test_a_search_still_above_target_after_one_epoch_is_restarted_while_restarts_remain():
    decision, step = run_rule(SLOW, may_restart=True)
    assert decision.reason == "restart" and decision.under_trained and step == EPOCH
    decision, step = run_rule(SLOW, may_restart=False)  # the last try runs on under the rule
    assert decision.reason == "near-chance" and step == 80


def test_a_search_near_chance_at_one_epoch_is_not_restarted():
    decision, step = run_rule(trajectory(0.97, 0.95, 0.93, 0.9, 0.86, 0.8, 0.75, 0.7, 0.6), may_restart=True)
    assert decision.reason == "near-chance" and step == EPOCH


def test_restart_waits_for_the_step_floor_on_small_training_sets():
    # 10 steps an epoch: a search is slow only from the rule's 64-step floor on, as for calling it flat
    checks = [Check(s, 0.9) for s in range(0, 80, 2)]
    for i in range(1, len(checks) + 1):
        decision = decide(RULE, checks[:i], 2, steps_per_epoch=10, warmup_steps=0, may_restart=True)
        if decision:
            break
    assert decision.reason == "restart" and checks[i - 1].step == RULE.flat_min_steps


def test_restart_seeds_are_distinct_and_stay_in_range():
    assert [try_seed(7, k) for k in range(3)] == [7, 1007, 2007]
    assert try_seed(2**32 - 1, 1) == 999
    with pytest.raises(OptionError):
        BudgetRule(max_restarts=-1)


@pytest.mark.slow
def test_a_slow_try_is_abandoned_and_recorded(tiny_minilm, data_dir, tmp_path):
    from peftguard.data import load_dataset
    from peftguard.defenses.psim import train_psim
    from peftguard.training import TrainSettings

    # a target no PSIM reaches, and small floors: the first try is slow at step 8, the last runs to its 16-step budget
    rule = BudgetRule(target_share=1e-6, max_restarts=1, flat_min_steps=8, min_budget_steps=16)
    manifest = train_psim(tiny_minilm, load_dataset("sst2", data_dir=data_dir), TrainSettings(lr=3e-4, max_length=48),
                          tmp_path / "psim", budget=rule, max_train_samples=96, max_eval_samples=40)
    budget = manifest["budget"]
    [abandoned] = budget["abandoned_tries"]
    assert abandoned["seed"] == 0 and abandoned["stop_reason"] == "restart" and abandoned["stopped_at_step"] == 8
    assert budget["seed"] == manifest["seed"] == 1000
    assert budget["stop_reason"] == "budget" and manifest["under_trained"] and manifest["training"]["steps"] == 16
    assert budget["abandoned_seconds"] == abandoned["seconds"] > 0
