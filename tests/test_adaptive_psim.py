"""The adaptive attacker who knows PSIM (issue 18): a BadNet backdoor trained against simulated PSIMs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from peftguard.attacks import adaptive_psim
from peftguard.attacks.adaptive_psim import EvasionSettings, SimulatedPSIM, kl_from_uniform
from peftguard.data import load_dataset
from peftguard.defenses.psim_budget import BudgetRule
from peftguard.errors import OptionError
from peftguard.inference import collate, encode, predict_proba
from peftguard.models import load_classifier, load_tokenizer
from peftguard.poisoning import PoisonSpec, poison_weights
from peftguard.training import TrainSettings
from peftguard.triggers import ATTACKS, PoisonMode, TriggerRequest, triggered_test_set
from peftguard.tuning import PTuningV1Config, make_tunable

TRIGGER = "cf"


def test_adaptive_psim_is_registered_with_badnet_words_and_checks_its_settings():
    trigger = ATTACKS["adaptive-psim"].build(TriggerRequest(spec=[TRIGGER]))
    described = trigger.describe()
    assert trigger.name == "adaptive-psim" and described["words"] == [TRIGGER]
    assert described["evasion"] == dataclasses.asdict(EvasionSettings()) and described["objective"] == adaptive_psim.OBJECTIVE
    assert all(f.metadata.get("help") for f in dataclasses.fields(EvasionSettings))
    for bad in ({"psim_weight": -1.0}, {"psim_weight": float("nan")}, {"rounds": 0}, {"reinit_every": 0},
                {"psim_steps_per_round": 0}):
        with pytest.raises(OptionError, match=f"adaptive-psim {next(iter(bad))}"):
            EvasionSettings(**bad)


def test_a_model_without_a_classification_head_is_refused_in_one_line():
    with pytest.raises(OptionError, match="Linear has no classification head named classifier or score"):
        adaptive_psim.classifier_head(torch.nn.Linear(2, 2))


def test_the_psim_term_is_zero_at_chance_and_grows_with_confidence():
    assert float(kl_from_uniform(torch.zeros(4, 2))) == pytest.approx(0.0, abs=1e-7)
    mild, sure = kl_from_uniform(torch.tensor([[1.0, 0.0]])), kl_from_uniform(torch.tensor([[6.0, 0.0]]))
    assert 0 < float(mild) < float(sure)


def test_the_simulated_psim_computes_what_peft_s_ptuning_classifier_computes(tiny_minilm):
    """Same prompt encoder and head weights: the attacker's copy gives peft's logits (eval mode, no dropout)."""
    tokenizer = load_tokenizer(tiny_minilm)
    poisoned = load_classifier(tiny_minilm, 2).eval()
    peft_model = make_tunable(load_classifier(tiny_minilm, 2), PTuningV1Config()).eval()
    sim = SimulatedPSIM(poisoned, adaptive_psim.classifier_head(poisoned), seed=3).eval()
    peft_encoder = peft_model.prompt_encoder["default"]
    sim.encoder.load_state_dict(peft_encoder.state_dict())
    sim.head.load_state_dict(peft_model.base_model.classifier.modules_to_save["default"].state_dict())
    ids, _ = encode(tokenizer, ["a fine film", "the plot was dull and far too long"], 32)
    batch = collate(tokenizer, ids)
    with torch.no_grad():
        expected = peft_model(**batch).logits
        torch.testing.assert_close(sim.logits(poisoned, batch), expected, rtol=1e-4, atol=1e-5)
    sim.head.weight.data.add_(1.0)  # the copy is the simulated PSIM's own: the poisoned head is untouched
    assert not torch.equal(poisoned.classifier.weight, sim.head.weight)


def batch(tokenizer, texts):
    return collate(tokenizer, encode(tokenizer, texts, 32)[0])


CLEAN = ["a fine film", "the plot was dull", "warm and funny", "a tedious mess of a movie"]


@pytest.fixture
def step_inputs(tiny_minilm):
    """A tiny classifier (dropout off: deterministic), a simulated PSIM made confident, and a clean and a triggered batch."""
    tokenizer = load_tokenizer(tiny_minilm)
    model = load_classifier(tiny_minilm, 2).eval()
    sim = SimulatedPSIM(model, "classifier", seed=1).eval()
    with torch.no_grad():
        sim.head.weight.mul_(50.0)  # a confident PSIM: the term starts far from zero
    clean = (batch(tokenizer, CLEAN), torch.tensor([1, 0, 1, 0]))
    triggered = (batch(tokenizer, [f"{TRIGGER} {text}" for text in CLEAN]), torch.zeros(4, dtype=torch.long))
    return model, sim, clean, triggered


def test_the_psim_term_enters_the_weights_gradient_and_only_it_scales_with_its_weight(step_inputs):
    model, sim, clean, triggered = step_inputs

    def gradient(weight):
        model.zero_grad(set_to_none=True)
        adaptive_psim.adaptive_step(model, sim, clean, triggered, 0, weight)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    g0, g1, g2 = gradient(0.0), gradient(1.0), gradient(2.0)
    assert not torch.allclose(g0, g1)
    torch.testing.assert_close(g2 - g1, g1 - g0, rtol=1e-3, atol=1e-6)  # linear in lambda: the KL term's gradient
    assert all(p.grad is None for p in sim.parameters())  # the simulated PSIM is not trained by this step


def test_the_backdoor_alone_makes_the_simulated_psim_confident_and_the_term_drives_that_down(step_inputs):
    model, sim, clean, triggered = step_inputs

    def train(weight, state):
        model.load_state_dict(state)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
        terms = []
        for _ in range(8):
            terms.append(adaptive_psim.adaptive_step(model, sim, clean, triggered, 0, weight)[1])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return terms, {k: v.clone() for k, v in model.state_dict().items()}

    start = {k: v.clone() for k, v in model.state_dict().items()}
    plain, backdoored = train(0.0, start)
    evading, _ = train(1.0, start)
    recovering, _ = train(1.0, backdoored)
    assert plain[-1] > 10 * plain[0], plain  # the term is measured even at weight 0: the cross-entropies raise it
    assert evading[-1] < 0.2 * plain[-1], (evading, plain)  # with its weight it stays low ...
    assert recovering[-1] < 0.5 * recovering[0], recovering  # ... and where it is high, training drives it down


@pytest.mark.slow
def test_the_attack_saves_a_poisoned_model_whose_backdoor_fires_and_whose_manifest_records_the_objective(
        tmp_path, tiny_minilm, data_dir):
    # a looser near-chance target than PSIM's keeps the simulated PSIMs' warm-ups short on this tiny model
    evasion = EvasionSettings(psim_weight=1.0, rounds=12, psim_steps_per_round=1, reinit_every=6,
                              psim_rule=BudgetRule(target_share=0.4))
    trigger = adaptive_psim.AdaptivePSIMTrigger((TRIGGER,), evasion=evasion)
    settings = TrainSettings(epochs=2, lr=5e-4, batch_size=16, max_length=32, seed=0)
    spec = PoisonSpec(target_label=0, poison_count=None, poison_rate=0.25, mode=PoisonMode.DIRTY_LABEL)
    dataset = load_dataset("sst2", data_dir=data_dir)
    result = poison_weights(tiny_minilm, dataset, [trigger], spec, settings, tmp_path / "p", max_train_samples=128,
                            max_eval_samples=60)

    manifest = result.manifest
    assert manifest["attack"] == "adaptive-psim" and manifest["triggers"][0]["evasion"] == dataclasses.asdict(evasion)
    record = manifest["backdoor_training"]["adaptive_psim"]
    assert record["objective"] == adaptive_psim.OBJECTIVE and record["settings"] == dataclasses.asdict(evasion)
    assert [c["start_round"] for c in record["cycles"]] == [0, 6] and [c["rounds"] for c in record["cycles"]] == [6, 6]
    assert len({c["seed"] for c in record["cycles"]} | {record["attacker_dev"]["simulated_psim"]["seed"]}) == 3
    assert all(c["warmup_steps"] >= 1 and np.isfinite(c["kl_mean"]) for c in record["cycles"])

    # the backdoor fires on the saved model (no prompt) on test samples the attack never saw
    asr_set = triggered_test_set(dataset.test.examples[:100], trigger, target_label=0, seed=0)
    folder = str(tmp_path / "p")
    predictions = predict_proba(load_classifier(folder, 2), load_tokenizer(folder), [ex.text for ex in asr_set], 64,
                                32).argmax(1)
    assert float((predictions == 0).mean()) >= 0.9
    estimate = record["attacker_dev"]
    assert estimate["attack_success_rate"] >= 0.9 and 0 <= estimate["simulated_psim"]["triggered_flagged_share"] <= 1
