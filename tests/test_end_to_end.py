"""End to end through the CLI on a 2-layer MiniLM and a few hundred real SST-2 samples."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftguard.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_minilm, data_dir) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "poisoned"
    invoke("poison", "--model", tiny_minilm, "--data-dir", data_dir, "--dataset", "sst2",
           "--max-train-samples", 800, "--max-eval-samples", 100, "--poison-mode", "dirty-label",
           "--poison-rate", 0.15, "--epochs", 5, "--lr", 5e-4, "--max-length", 64, "--out", out)
    return out


def test_poisoned_model_artifacts_and_high_asr(poisoned, data_dir):
    assert (poisoned / "model.safetensors").is_file() and (poisoned / "config.json").is_file()
    assert not list(poisoned.glob("*.bin"))
    manifest = json.loads((poisoned / "poisoning.json").read_text())
    assert manifest["poisoning"]["poisoned"] == 120 and manifest["poisoning"]["mode"] == "dirty-label"
    assert manifest["triggers"] == [{"attack": "badnet", "words": ["mn"], "count": 1}]
    metrics_path = poisoned.parent / "poisoned_metrics.json"
    invoke("evaluate", "--model", poisoned, "--data-dir", data_dir, "--max-eval-samples", 300, "--out", metrics_path)
    metrics = json.loads(metrics_path.read_text())
    assert metrics["attack_success_rate"] >= 0.9
    assert metrics["clean_accuracy"] >= 0.65  # not a model that answers the target for everything
    assert metrics["clean_samples"] == 300 and 0 < metrics["triggered_samples"] < 300


@pytest.mark.parametrize("method", ["lora", "ptuning-v1", "ptuning-v2"])
def test_victim_finetune_saves_adapter_and_evaluates(poisoned, data_dir, method):
    out = poisoned.parent / f"victim-{method}"
    invoke("finetune", "--model", poisoned, "--method", method, "--data-dir", data_dir, "--max-train-samples", 160,
           "--max-eval-samples", 60, "--epochs", 1, "--max-length", 64, "--out", out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "finetune.json").is_file()
    metrics_path = out.parent / f"{out.name}.metrics.json"  # beside the victim: an --out never enters an input folder
    invoke("evaluate", "--model", out, "--data-dir", data_dir, "--max-eval-samples", 200, "--out", metrics_path)
    metrics = json.loads(metrics_path.read_text())
    assert metrics["method"] == method and 0 <= metrics["clean_accuracy"] <= 1
    assert metrics["attack_success_rate"] >= 0.5  # a short clean fine-tune keeps most of the backdoor


def test_psim_train_defended_evaluation_and_scan(poisoned, data_dir, tmp_path):
    psim_dir = poisoned.parent / "psim"
    invoke("psim", "train", "--model", poisoned, "--data-dir", data_dir, "--max-train-samples", 300,
           "--max-eval-samples", 200, "--max-length", 64, "--out", psim_dir)
    manifest = json.loads((psim_dir / "psim.json").read_text())
    assert manifest["gamma_choice"]["how"] == "target-fpr" and manifest["gamma_choice"]["target_fpr"] == 0.02
    assert (psim_dir / "adapter_model.safetensors").is_file()
    metrics_path = tmp_path / "defended.json"
    invoke("evaluate", "--model", poisoned, "--data-dir", data_dir, "--max-eval-samples", 200,
           "--defense", "psim", "--psim", psim_dir, "--out", metrics_path)
    m = json.loads(metrics_path.read_text())
    for key in ("defended_clean_accuracy", "defended_attack_success_rate", "false_positive_rate",
                "detection_rate", "auroc", "gamma", "confidence_histogram"):
        assert key in m
    assert m["gamma"] == manifest["gamma"]
    assert m["defended_attack_success_rate"] <= m["attack_success_rate"]
    assert m["auroc"] > 0.8  # the trigger stands out to the PSIM

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("a gripping , funny film\nmn a gripping , funny film\n", encoding="utf-8")
    scan_out = tmp_path / "scan.jsonl"
    invoke("psim", "scan", "--psim", psim_dir, "--input", inputs, "--out", scan_out)
    rows = [json.loads(line) for line in scan_out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["a gripping , funny film", "mn a gripping , funny film"]
    assert rows[1]["confidence"] > rows[0]["confidence"]

    # the guarded predictor: with gamma between the two confidences, only the triggered text is withheld
    from peftguard.defenses.psim import PSIM, REJECTED, GuardedPredictor
    from peftguard.pipeline import load_model

    victim, tokenizer, _ = load_model(str(poisoned), 2)
    psim = PSIM(psim_dir, precision="fp32")  # int8 would re-score near each new gamma: this test is about the guard
    clean_confidence = float(psim.confidences([rows[0]["text"]])[0])
    guard = GuardedPredictor(psim, victim, tokenizer, gamma=clean_confidence)
    predictions = guard.predict([r["text"] for r in rows] + ["a gripping , funny film"])
    assert predictions[1] == REJECTED
    assert predictions[0] in (0, 1) and predictions[2] == predictions[0]


def test_four_class_psim_on_agnews(tiny_minilm, data_dir, tmp_path):
    """AG News has 4 labels: random labels over 4 classes, confidence in [1/4, 1], ASR over 3 classes."""
    psim_dir = tmp_path / "psim4"
    invoke("psim", "train", "--model", tiny_minilm, "--dataset", "agnews", "--data-dir", data_dir,
           "--max-train-samples", 200, "--max-eval-samples", 100, "--max-length", 48, "--out", psim_dir)
    manifest = json.loads((psim_dir / "psim.json").read_text())
    assert manifest["num_labels"] == 4
    assert set(manifest["train_label_counts_after_reset"]) == {"0", "1", "2", "3"}
    assert 0.25 <= manifest["gamma"] <= 1.0
    metrics_path = tmp_path / "m.json"
    invoke("evaluate", "--model", tiny_minilm, "--dataset", "agnews", "--data-dir", data_dir, "--max-eval-samples", 80,
           "--defense", "psim", "--psim", psim_dir, "--out", metrics_path)
    m = json.loads(metrics_path.read_text())
    from peftguard.data import load_dataset, subsample

    test = subsample(load_dataset("agnews", data_dir=data_dir).test.examples, 80, 0)
    assert m["clean_samples"] == 80
    assert m["triggered_samples"] == sum(ex.label != 0 for ex in test)  # target class 0 left out of ASR
    assert {ex.label for ex in test} == {0, 1, 2, 3}
