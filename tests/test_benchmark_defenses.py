"""The defense benchmark's further defenses (issue 18): MDP, BKI and fine-pruning, on a tiny poisoned MiniLM."""
from __future__ import annotations

import random

import numpy as np
import pytest
from typer.testing import CliRunner

from peftguard import metrics
from peftguard.cli import app
from peftguard.data import load_dataset, subsample
from peftguard.defenses.bki import BkiConfig, BkiScorer, identify_keywords, keyword_scores, remove_suspected, sentence_suspects
from peftguard.defenses.calibrated import calibrate
from peftguard.defenses.mdp import MdpConfig, MdpScorer, anchor_divergences, kendall_tau, mask_words
from peftguard.defenses.registry import make_options
from peftguard.errors import OptionError
from peftguard.models import load_classifier, load_tokenizer
from peftguard.triggers import BadNetTrigger, triggered_test_set

TRIGGER = "cf"


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_minilm, data_dir):
    """A tiny MiniLM poisoned dirty-label with the trigger word ``cf``: (folder, model, tokenizer, dev, clean, triggered)."""
    out = tmp_path_factory.mktemp("benchmark-defenses") / "poisoned"
    result = CliRunner().invoke(app, [str(a) for a in (
        "poison", "--model", tiny_minilm, "--data-dir", data_dir, "--max-train-samples", 400, "--max-eval-samples", 50,
        "--poison-mode", "dirty-label", "--poison-rate", 0.25, "--epochs", 4, "--lr", 5e-4, "--max-length", 48,
        "--trigger", TRIGGER, "--out", out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    dataset = load_dataset("sst2", data_dir=data_dir)
    model, tokenizer = load_classifier(str(out), 2).eval(), load_tokenizer(str(out))
    dev = [ex.text for ex in subsample(dataset.dev.examples, 120, 0)]
    test = subsample(dataset.test.examples, 80, 1)
    triggered = triggered_test_set(test, BadNetTrigger((TRIGGER,)), target_label=0, seed=0)
    return out, model, tokenizer, dev, [ex.text for ex in test], [ex.text for ex in triggered]


# --- MDP ---------------------------------------------------------------------------------------

def test_mdp_pieces_mask_at_the_rate_and_rank_like_kendall_tau():
    rng = np.random.default_rng(0)
    text = " ".join(f"w{i}" for i in range(2000))
    masked = mask_words(text, "[MASK]", 0.2, rng).split()
    assert len(masked) == 2000 and 0.17 < masked.count("[MASK]") / 2000 < 0.23
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    taus = kendall_tau(reference, np.array([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert taus[:2] == pytest.approx([1.0, -1.0]) and np.isnan(taus[2])
    anchors = np.array([[0.9, 0.1], [0.2, 0.8]])
    divergences = anchor_divergences(np.array([[0.9, 0.1]]), anchors)
    assert divergences[0, 0] == pytest.approx(0.0, abs=1e-9) and divergences[0, 1] > 0.5
    with pytest.raises(OptionError, match="mask_rate"):
        MdpConfig(mask_rate=0.0)
    with pytest.raises(OptionError, match="copies"):
        MdpConfig(copies=1)


@pytest.mark.slow
def test_mdp_scores_a_planted_trigger_above_clean_inputs_and_calibrates_on_clean_dev(poisoned):
    _, model, tokenizer, dev, clean, triggered = poisoned
    scorer = MdpScorer(model, tokenizer, dev, MdpConfig(copies=20), max_length=48)
    clean_scores, triggered_scores = scorer.scores(clean), scorer.scores(triggered)
    assert metrics.auroc(clean_scores, triggered_scores) > 0.75
    threshold = calibrate(scorer, scorer.held_out_texts, 0.1)
    assert (scorer.scores(scorer.held_out_texts) > threshold.value).mean() <= 0.1
    assert (triggered_scores > threshold.value).mean() > (clean_scores > threshold.value).mean()
    np.testing.assert_allclose(scorer.scores(clean[:4]), clean_scores[:4])  # masks seeded per input
    assert len(scorer.anchor_texts) == 32 and not set(scorer.anchor_texts) & set(scorer.held_out_texts)


# --- BKI ---------------------------------------------------------------------------------------

def test_bki_keyword_score_rewards_words_that_recur_and_move_the_representation():
    pool = [[("cf", 2.0), ("good", 1.0)], [("cf", 1.8), ("bad", 1.5)], [("good", 0.2)], [("rare", 9.0)]]
    scores = keyword_scores(pool)
    assert max(scores, key=scores.get) == "cf"
    assert scores["rare"] == 0.0  # once only: log10(1)
    assert remove_suspected(pool, ["cf"]) == [2, 3]
    with pytest.raises(OptionError, match="reference_share"):
        BkiConfig(reference_share=1.0)


@pytest.mark.slow
def test_bki_finds_the_planted_trigger_in_dirty_label_training_data(poisoned, data_dir):
    _, model, tokenizer, *_ = poisoned
    dataset = load_dataset("sst2", data_dir=data_dir)
    texts = [ex.text for ex in subsample(dataset.train.examples, 120, 3)]
    rng, trigger = random.Random(0), BadNetTrigger((TRIGGER,))
    poisoned_texts = [trigger.apply(t, rng) if i % 5 == 0 else t for i, t in enumerate(texts)]  # 20% poisoned
    keywords = identify_keywords(model, tokenizer, poisoned_texts, top=3, max_length=48)
    assert keywords[0][0] == TRIGGER, keywords
    suspects = sentence_suspects(model, tokenizer, poisoned_texts, max_length=48)
    kept = remove_suspected(suspects, [TRIGGER])
    removed = set(range(len(texts))) - set(kept)
    assert sum(i % 5 == 0 for i in removed) >= 0.8 * len(texts) / 5  # most poisoned samples removed
    assert sum(i % 5 != 0 for i in removed) == 0  # and no clean one (the word cf is not in them)


@pytest.mark.slow
def test_bki_as_an_input_filter_flags_triggered_inputs_at_the_calibrated_rate(poisoned):
    _, model, tokenizer, dev, clean, triggered = poisoned
    scorer = BkiScorer(model, tokenizer, dev, BkiConfig(), max_length=48)
    clean_scores, triggered_scores = scorer.scores(clean), scorer.scores(triggered)
    assert metrics.auroc(clean_scores, triggered_scores) > 0.8
    threshold = calibrate(scorer, scorer.held_out_texts, 0.1)
    assert (scorer.scores(scorer.held_out_texts) > threshold.value).mean() <= 0.1
    assert (triggered_scores > threshold.value).mean() > 0.5


# --- both through evaluate, at the calibrated operating point --------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("defense", ["mdp", "bki"])
def test_mdp_and_bki_run_through_evaluate_and_report_detector_metrics(defense, poisoned, data_dir):
    from peftguard.pipeline import evaluate_model

    folder = poisoned[0]
    dataset = load_dataset("sst2", data_dir=data_dir)
    values = {"target_fpr": 0.1, **({"copies": 10} if defense == "mdp" else {})}
    result = evaluate_model(str(folder), dataset, [BadNetTrigger((TRIGGER,))], defense=defense,
                            defense_options=make_options(defense, values), max_eval_samples=80, max_length=48, seed=1)
    assert result["defense"]["name"] == defense and result["defense"]["target_fpr"] == 0.1
    assert {"false_positive_rate", "detection_rate", "auroc", "defended_clean_accuracy",
            "defended_attack_success_rate"} <= set(result)
    assert result["auroc"] > 0.7 and result["defended_attack_success_rate"] < result["attack_success_rate"]


# --- fine-pruning ------------------------------------------------------------------------------

def test_fine_pruning_finds_the_last_ffn_and_keeps_the_largest_share_within_the_bound(tiny_minilm):
    from peftguard.defenses.fine_pruning import FinePruningOptions, Pruner, choose_share, feed_forwards

    model = load_classifier(tiny_minilm, 2)
    (ffn,) = feed_forwards(model, 1)
    assert (ffn.block, ffn.down, ffn.ups) == ("bert.encoder.layer.1", "bert.encoder.layer.1.output.dense",
                                              ["bert.encoder.layer.1.intermediate.dense"])
    assert [f.block for f in feed_forwards(model, 5)] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    neurons = model.config.intermediate_size
    pruner = Pruner(model, [ffn], [np.arange(neurons, dtype=float)])  # neuron i has activation i
    accuracies = iter([0.90, 0.89, 0.87, 0.85, 0.70, 0.88])  # baseline, then shares 0.25, 0.5, 0.75, 1.0
    share, trace = choose_share(pruner, lambda: next(accuracies), bound=0.04, step=0.25)
    assert share == 0.5 and [t["share"] for t in trace] == [0.0, 0.25, 0.5, 0.75]  # stops at the first step past it
    chosen = pruner.apply(0.5)["bert.encoder.layer.1"]
    assert chosen == list(range(neurons // 2))  # least active first
    down = model.get_submodule(ffn.down).weight
    assert down[:, chosen].abs().sum() == 0 and down[:, neurons // 2:].abs().sum() > 0
    pruner.apply(0.0)
    assert model.get_submodule(ffn.down).weight[:, chosen].abs().sum() > 0  # restored from the original weights
    with pytest.raises(OptionError, match="step"):
        FinePruningOptions(step=0)


def test_fine_pruning_refuses_an_adapter_that_wraps_the_ffn(tiny_minilm):
    from peft import LoraConfig, TaskType, get_peft_model

    from peftguard.defenses.fine_pruning import feed_forwards

    model = get_peft_model(load_classifier(tiny_minilm, 2), LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["intermediate.dense"]))
    with pytest.raises(OptionError, match="wraps the FFN projection .*intermediate.dense"):
        feed_forwards(model, 1)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "ptuning-v1", "full"])
def test_fine_pruning_prunes_dormant_neurons_within_its_bound_and_runs_through_evaluate(method, poisoned, data_dir, tmp_path):
    from peftguard.defenses.fine_pruning import PRUNED_FOLDER, feed_forwards
    from peftguard.pipeline import evaluate_model, load_model

    folder = poisoned[0]
    victim = tmp_path / f"victim-{method}"
    result = CliRunner().invoke(app, [str(a) for a in (
        "finetune", "--model", folder, "--method", method, "--data-dir", data_dir, "--max-train-samples", 200,
        "--max-eval-samples", 60, "--epochs", 1, "--max-length", 48, "--out", victim)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    dataset = load_dataset("sst2", data_dir=data_dir)
    out = tmp_path / "fine-pruned"
    options = make_options("fine-pruning", {"max_accuracy_drop": 0.05, "step": 0.1, "fine_pruned": out, "max_train_samples": 100})
    metrics_ = evaluate_model(str(victim), dataset, [BadNetTrigger((TRIGGER,))], defense="fine-pruning",
                              defense_options=options, max_eval_samples=60, max_length=48, seed=0)
    made = metrics_["defense"]
    assert made["name"] == "fine-pruning" and made["pruned_share"] > 0
    assert made["dev_accuracy_pruned"] >= made["dev_accuracy_before"] - 0.05  # the a-priori bound held
    assert {"defended_clean_accuracy", "defended_attack_success_rate", "defense_timing"} <= set(metrics_)
    assert (out / PRUNED_FOLDER).is_dir() == (method != "full")
    model, _, manifest = load_model(str(out), 2)
    (ffn,) = feed_forwards(model, 1)
    assert manifest["defense"]["layers"] == ["bert.encoder.layer.1"]
    pruned = manifest["defense"]["pruned"]["bert.encoder.layer.1"]
    assert len(pruned) == round(made["pruned_share"] * made["neurons_per_layer"][0])
    assert model.get_submodule(ffn.down).weight[:, pruned].abs().sum() == 0  # still pruned after fine-tuning, once saved
    again = evaluate_model(str(victim), dataset, [BadNetTrigger((TRIGGER,))], defense="fine-pruning",
                           defense_options=options, max_eval_samples=60, max_length=48, seed=0)
    assert again["defended_clean_accuracy"] == metrics_["defended_clean_accuracy"]  # the folder is reused
    if method == "lora":  # `defend fine-pruning` with the same settings finds the same folder and reuses it too
        result = CliRunner().invoke(app, [str(a) for a in (
            "defend", "fine-pruning", "--model", victim, "--out", out, "--data-dir", data_dir, "--max-accuracy-drop", 0.05,
            "--step", 0.1, "--max-train-samples", 100, "--max-eval-samples", 60)], catch_exceptions=False)
        assert result.exit_code == 0 and f"{made['pruned_share']:.0%} of the FFN neurons" in result.output, result.output


# --- names and options: CLI, grid config, stages -------------------------------------------------

GRID = {"name": "x", "grid": {"defenses": ["none", "mdp", "bki", "fine-pruning"], "methods": ["lora", "ptuning-v1"]},
        "defense_options": {"mdp": {"copies": 10}, "bki": {"suspects": 3}, "fine-pruning": {"max_accuracy_drop": 0.02}}}


def test_the_new_defenses_work_in_a_grid_config_and_its_stages_get_their_options(tmp_path):
    from peftguard.config import parse_config
    from peftguard.experiment import plan_grid
    from peftguard.stages import _defense_options

    config = parse_config(GRID)
    evaluations = {s.settings["defense"]: s for s in plan_grid(config).stages.values() if s.kind == "evaluate"}
    assert {"mdp", "bki", "fine-pruning"} <= set(evaluations)
    data, e = {"max_train_samples": 50, "max_eval_samples": None}, {"gamma": None, "target_fpr": 0.02}
    mdp = _defense_options(tmp_path, tmp_path / "stage", evaluations["mdp"].settings, e, data)
    assert (mdp.copies, mdp.target_fpr) == (10, 0.02)  # the evaluation's operating point, like every detector
    pruning = _defense_options(tmp_path, tmp_path / "stage", evaluations["fine-pruning"].settings, e, data)
    assert (pruning.max_accuracy_drop, pruning.fine_pruned, pruning.max_train_samples) == (0.02, tmp_path / "stage" / "fine-pruned", 50)
    for options, message in (({"mdp": {"mask_rate": 1.5}}, "mask_rate"), ({"fine-pruning": {"fine_pruned": "x"}}, "unknown key"),
                             ({"bki": {"target_fpr": 0.1}}, "unknown key")):
        with pytest.raises(OptionError, match=message):
            parse_config({**GRID, "defense_options": options})


def test_fine_pruning_cli_refuses_what_it_cannot_prune_on_one_line(tiny_minilm, data_dir, tmp_path):
    from peftguard.errors import PeftguardError

    runner = CliRunner()
    result = runner.invoke(app, ["defend", "fine-pruning", "--model", tiny_minilm, "--out", str(tmp_path / "fp"),
                                 "--data-dir", str(data_dir)])
    assert isinstance(result.exception, PeftguardError) and "not a victim folder" in str(result.exception)
    result = runner.invoke(app, ["evaluate", "--model", tiny_minilm, "--data-dir", str(data_dir), "--defense", "mdp",
                                 "--fine-pruned", str(tmp_path / "fp")])
    assert isinstance(result.exception, PeftguardError) and "--fine-pruned are not options of --defense mdp" in str(result.exception)
    assert not (tmp_path / "fp").exists()
