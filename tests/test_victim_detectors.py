"""Detectors that read the victim (STRIP, DAN) and the calibrated threshold they share."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import pytest
from typer.testing import CliRunner

from peftguard import metrics
from peftguard.cli import app
from peftguard.data import load_dataset, subsample
from peftguard.defenses.calibrated import CalibratedDetector, calibrate
from peftguard.defenses.registry import make_options
from peftguard.defenses.dan import DanConfig, DanScorer, LayerGaussians, split_indices
from peftguard.defenses.strip import StripConfig, StripScorer, SubstitutionWords, perturb, prediction_entropy
from peftguard.errors import OptionError
from peftguard.models import load_classifier, load_tokenizer
from peftguard.triggers import BadNetTrigger, triggered_test_set

TRIGGER = "cf"


class ConstantScorer:
    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    def scores(self, texts, *, desc=None) -> np.ndarray:
        return np.array([self.values[t] for t in texts])

    def settings(self) -> dict:
        return {"kind": "constant"}


@pytest.mark.parametrize("target_fpr", [0.0, 0.02, 0.1, 0.25])
def test_calibration_flags_at_most_the_target_share_of_clean_dev(target_fpr):
    rng = np.random.default_rng(0)
    dev = {f"dev{i}": float(v) for i, v in enumerate(rng.normal(size=200))}
    detector = CalibratedDetector("constant", ConstantScorer(dev), calibrate(ConstantScorer(dev), list(dev), target_fpr))
    flagged = detector.screen(list(dev)).flagged
    assert flagged.mean() <= target_fpr
    assert flagged.sum() == int(np.floor(target_fpr * 200))  # distinct scores: exactly the allowed count
    assert detector.describe()["target_fpr"] == target_fpr and detector.describe()["kind"] == "constant"


def test_strip_perturbation_overwrites_the_swap_share_with_words_of_one_clean_sentence():
    words = SubstitutionWords(["the film is a gorgeous triumph", "a dull and lifeless mess of a movie"])
    config = StripConfig(repeat=3, swap_ratio=0.5)
    text = "one two three four five six seven eight"
    copy = perturb(text, words, config, np.random.default_rng(1))
    changed = [new for old, new in zip(text.split(), copy.split()) if old != new]
    assert len(copy.split()) == 8 and 1 <= len(changed) <= 4
    assert any(set(changed) <= set(piece) for piece in words.pieces)


def test_strip_entropy_and_settings_are_checked():
    assert prediction_entropy(np.array([[0.5, 0.5], [1.0, 0.0]])) == pytest.approx([1.0, 0.0], abs=1e-6)
    with pytest.raises(OptionError, match="swap_ratio"):
        StripConfig(swap_ratio=0)
    with pytest.raises(OptionError, match="repeat"):
        StripConfig(repeat=0)
    with pytest.raises(OptionError, match="content word"):
        SubstitutionWords(["the a of", "and the"])


def test_dan_distances_grow_away_from_the_clean_classes():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    features = rng.normal(size=(2, 200, 8)) + labels[None, :, None] * 3.0  # two layers, two separated classes
    gaussians = LayerGaussians(features, labels)
    near = np.zeros((2, 1, 8))
    far = np.full((2, 1, 8), 12.0)
    assert (gaussians.distances(far) > gaussians.distances(near) + 5).all()
    fit, held = split_indices(10, 0.5, 0)
    assert sorted([*fit, *held]) == list(range(10)) and len(fit) == 5


@pytest.fixture(scope="module")
def victim(tmp_path_factory, tiny_minilm, data_dir):
    out = tmp_path_factory.mktemp("detectors") / "poisoned"
    result = CliRunner().invoke(app, [str(a) for a in (
        "poison", "--model", tiny_minilm, "--data-dir", data_dir, "--max-train-samples", 400, "--max-eval-samples", 50,
        "--poison-mode", "dirty-label", "--poison-rate", 0.25, "--epochs", 4, "--lr", 5e-4, "--max-length", 48,
        "--trigger", TRIGGER, "--out", out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    dataset = load_dataset("sst2", data_dir=data_dir)
    model, tokenizer = load_classifier(str(out), 2), load_tokenizer(str(out))
    dev = subsample(dataset.dev.examples, 200, 0)
    test = subsample(dataset.test.examples, 120, 1)
    triggered = triggered_test_set(test, BadNetTrigger((TRIGGER,)), target_label=0, seed=0)
    return model.eval(), tokenizer, dev, [ex.text for ex in test], [ex.text for ex in triggered], out


@pytest.mark.slow
def test_strip_scores_a_planted_trigger_as_more_suspicious(victim):
    model, tokenizer, dev, clean, triggered, _ = victim
    scorer = StripScorer(model, tokenizer, [ex.text for ex in dev], StripConfig(), max_length=48)
    clean_scores, triggered_scores = scorer.scores(clean), scorer.scores(triggered)
    assert metrics.auroc(clean_scores, triggered_scores) > 0.8
    np.testing.assert_allclose(scorer.scores(clean[:5]), clean_scores[:5], atol=1e-5)  # seeded per input, not per batch


@pytest.mark.slow
def test_dan_scores_a_planted_trigger_as_more_suspicious(victim):
    model, tokenizer, dev, clean, triggered, _ = victim
    scorer = DanScorer(model, tokenizer, [ex.text for ex in dev], [ex.label for ex in dev], DanConfig(), max_length=48)
    assert metrics.auroc(scorer.scores(clean), scorer.scores(triggered)) > 0.8
    threshold = calibrate(scorer, scorer.held_out_texts, 0.05)
    assert (scorer.scores(scorer.held_out_texts) > threshold.value).mean() <= 0.05


def test_rap_settings_are_checked():
    from peftguard.defenses.rap import RapConfig

    with pytest.raises(OptionError, match="drop_min"):
        RapConfig(drop_min=0.3, drop_max=0.1)
    with pytest.raises(OptionError, match="train_share"):
        RapConfig(train_share=1.0)


@pytest.mark.slow
def test_rap_scores_a_planted_trigger_as_more_suspicious_and_leaves_the_victim_unchanged(victim):
    from peftguard.defenses.rap import RapConfig, RapScorer

    model, tokenizer, dev, clean, triggered, _ = victim
    before = model.get_input_embeddings().weight.detach().clone()
    scorer = RapScorer(model, tokenizer, [ex.text for ex in dev], RapConfig(word="bb"), max_length=48)
    assert metrics.auroc(scorer.scores(clean), scorer.scores(triggered)) > 0.8
    assert torch.equal(model.get_input_embeddings().weight, before)
    assert not torch.equal(scorer.rows[0], scorer.original)  # the row trained
    assert set(scorer.settings()["trained"]) == {"0", "1"}  # rate and clean objective reached, per class


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["strip", "dan"])
def test_a_victim_detector_runs_through_evaluate_at_the_calibrated_operating_point(defense, victim, data_dir):
    from peftguard.pipeline import evaluate_model

    *_, folder = victim
    dataset = load_dataset("sst2", data_dir=data_dir)
    options = make_options(defense, {"target_fpr": 0.1})
    result = evaluate_model(str(folder), dataset, [BadNetTrigger((TRIGGER,))], defense=defense, defense_options=options,
                            max_eval_samples=120, max_length=48, seed=1)
    assert result["defense"]["name"] == defense and result["defense"]["target_fpr"] == 0.1
    assert result["auroc"] > 0.8 and result["detection_rate"] > 0.5
    assert result["false_positive_rate"] <= 0.25  # calibrated on dev to 0.1; measured on test
    assert result["defended_attack_success_rate"] < result["attack_success_rate"]
