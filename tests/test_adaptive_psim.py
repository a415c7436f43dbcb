"""The adaptive attacker who knows PSIM (issue 18): a BadNet backdoor trained against simulated PSIMs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from peftguard.attacks import adaptive_psim
from peftguard.attacks.adaptive_psim import EvasionSettings, SimulatedPSIM, kl_from_uniform
from peftguard.data import load_dataset
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


def poison(tiny_minilm, data_dir, out, weight: float):
    trigger = adaptive_psim.AdaptivePSIMTrigger(
        (TRIGGER,), evasion=EvasionSettings(psim_weight=weight, rounds=24, psim_steps_per_round=2, reinit_every=8))
    settings = TrainSettings(epochs=2, lr=5e-4, max_length=48, seed=0)
    spec = PoisonSpec(target_label=0, poison_count=None, poison_rate=0.25, mode=PoisonMode.DIRTY_LABEL)
    return trigger, poison_weights(tiny_minilm, load_dataset("sst2", data_dir=data_dir), [trigger], spec, settings, out,
                                   max_train_samples=240, max_eval_samples=80)


@pytest.mark.slow
def test_the_psim_term_enters_the_loss_and_the_backdoor_still_fires(tmp_path, tiny_minilm, data_dir):
    trigger, evading = poison(tiny_minilm, data_dir, tmp_path / "evading", weight=1.0)
    _, plain = poison(tiny_minilm, data_dir, tmp_path / "plain", weight=0.0)

    manifest = evading.manifest
    assert manifest["attack"] == "adaptive-psim" and manifest["triggers"][0]["evasion"]["psim_weight"] == 1.0
    record = manifest["backdoor_training"]["adaptive_psim"]
    assert record["objective"] == adaptive_psim.OBJECTIVE and record["settings"]["reinit_every"] == 8
    assert [c["start_round"] for c in record["cycles"]] == [0, 8, 16]
    assert len({c["seed"] for c in record["cycles"]}) == 3  # a fresh simulated PSIM each cycle

    # the same seed, only the weight of the PSIM term differs: different weights, and only the evading run
    # drives the term down (each cycle's fresh PSIM starts from the term the weights give it)
    def weights(folder):
        return load_classifier(str(folder), 2).state_dict()

    a, b = weights(tmp_path / "evading"), weights(tmp_path / "plain")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    kl = [c["kl_mean"] for c in record["cycles"]]
    plain_kl = [c["kl_mean"] for c in plain.manifest["backdoor_training"]["adaptive_psim"]["cycles"]]
    assert kl[-1] < kl[0] and kl[-1] < plain_kl[-1], (kl, plain_kl)

    # the backdoor still fires on the poisoned model (no prompt), on test samples the attack never saw
    dataset = load_dataset("sst2", data_dir=data_dir)
    asr_set = triggered_test_set(dataset.test.examples[:120], trigger, target_label=0, seed=0)
    model, tokenizer = load_classifier(str(tmp_path / "evading"), 2), load_tokenizer(str(tmp_path / "evading"))
    predictions = predict_proba(model, tokenizer, [ex.text for ex in asr_set], 64, 48).argmax(1)
    assert float((predictions == 0).mean()) >= 0.9
    estimate = record["attacker_dev"]
    assert estimate["attack_success_rate"] >= 0.9 and 0 <= estimate["simulated_psim"]["triggered_flagged_share"] <= 1
    assert np.isfinite(estimate["simulated_psim"]["auroc"])
