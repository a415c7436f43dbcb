"""Adapters checked against their base model, truncation counted, stale temporaries removed."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftguard.artifacts import atomic_dir, remove_stale_temporaries, write_json
from peftguard.data import Example
from peftguard.errors import PeftguardError
from peftguard.evaluation import EvalSettings, evaluate
from peftguard.models import load_classifier, load_tokenizer
from peftguard.pipeline import load_model
from peftguard.triggers import build_triggers
from peftguard.tuning import make_tunable, method_config, save_tuned
from peftguard.victims import MANIFEST as VICTIM_MANIFEST


# --- adapters that do not fit their base model ---------------------------------------------------
def save_untrained_adapter(base_ref: str, method: str, folder: Path, num_labels: int = 2) -> Path:
    """An adapter folder as `finetune` writes it (training does not change any shape)."""
    model = make_tunable(load_classifier(base_ref, num_labels), method_config(method))
    manifest = {"kind": "victim", "method": method, "base_model": base_ref, "num_labels": num_labels}
    save_tuned(model, load_tokenizer(base_ref), folder, VICTIM_MANIFEST, manifest)
    return folder


def point_manifest_at(folder: Path, **changes: object) -> None:
    """What a user does by copying an adapter next to another base model, or a run's base changing."""
    manifest = json.loads((folder / VICTIM_MANIFEST).read_text())
    write_json(folder / VICTIM_MANIFEST, {**manifest, **changes})


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory: pytest.TempPathFactory, tiny_minilm: str) -> dict[str, str]:
    """Two tiny classifiers built from configs: a BERT of hidden size 32 and a GPT-2."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_minilm)
    models = {
        "bert-hidden-32": BertForSequenceClassification(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
        "gpt2": GPT2ForSequenceClassification(GPT2Config(
            vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, pad_token_id=tokenizer.pad_token_id)),
    }
    folders = {}
    for name, model in models.items():
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


@pytest.mark.parametrize("method", ["lora", "ptuning-v1"])
@pytest.mark.parametrize(
    "base, num_labels, message",
    [
        ("bert-hidden-32", 2, "trained for another architecture"),
        ("gpt2", 2, "does not fit base model"),
        ("same", 3, "needs [3]"),
    ],
    ids=["hidden-size", "architecture", "label-count"],
)
def test_adapter_for_another_base_is_a_clear_error(
    method: str, base: str, num_labels: int, message: str, tiny_minilm: str, other_bases: dict[str, str], tmp_path: Path
) -> None:
    folder = save_untrained_adapter(tiny_minilm, method, tmp_path / "victim")
    point_manifest_at(folder, base_model=other_bases.get(base, tiny_minilm), num_labels=num_labels)
    with pytest.raises(PeftguardError) as error:
        load_model(str(folder), num_labels)
    text = str(error.value)
    assert message in text and str(folder) in text and "\n" not in text


def test_matching_adapter_still_loads(tiny_minilm: str, tmp_path: Path) -> None:
    folder = save_untrained_adapter(tiny_minilm, "prompt", tmp_path / "victim")
    model, _, manifest = load_model(str(folder), 2)
    assert manifest["method"] == "prompt" and model.config.num_labels == 2


@pytest.mark.parametrize("kind", ["victim", "plain"])
def test_evaluated_models_run_where_compute_device_says(kind: str, tiny_minilm: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import peftguard.pipeline as pipeline

    # "meta" stands in for a GPU this CPU machine lacks: load_model must move both kinds of model there
    monkeypatch.setattr(pipeline, "compute_device", lambda: torch.device("meta"))
    ref = str(save_untrained_adapter(tiny_minilm, "lora", tmp_path / "victim")) if kind == "victim" else tiny_minilm
    model, _, _ = load_model(ref, 2)
    assert {p.device.type for p in model.parameters()} == {"meta"} and not model.training


def test_psim_folder_with_a_mismatched_head_is_a_clear_error(tiny_minilm: str, tmp_path: Path) -> None:
    from peftguard.defenses.psim import MANIFEST as PSIM_MANIFEST
    from peftguard.defenses.psim import PSIM

    model = make_tunable(load_classifier(tiny_minilm, 4), method_config("ptuning-v1"))
    manifest = {"kind": "psim", "method": "ptuning-v1", "base_model": tiny_minilm, "num_labels": 2,  # head has 4
                "settings": {"epochs": 1, "lr": 3e-4, "batch_size": 32, "max_length": 128, "seed": 0},
                "gamma": 0.7, "gamma_choice": {"gamma": 0.7, "how": "fixed"}}
    save_tuned(model, load_tokenizer(tiny_minilm), tmp_path / "psim", PSIM_MANIFEST, manifest)
    with pytest.raises(PeftguardError, match=r"has shape \[4\].*needs \[2\]"):
        PSIM(tmp_path / "psim")


# --- truncation is counted --------------------------------------------------------------------------
def test_evaluation_counts_truncated_texts_and_notes_them(tiny_minilm: str, caplog: pytest.LogCaptureFixture) -> None:
    long_text = " ".join(["word"] * 40)
    test = [Example(long_text, 1), Example("short one", 1), Example(long_text + " more", 0)]
    model, tokenizer = load_classifier(tiny_minilm, 2).eval(), load_tokenizer(tiny_minilm)
    with caplog.at_level(logging.WARNING, logger="peftguard.training"):
        result = evaluate(model, tokenizer, test, build_triggers(["badnet"]), target_label=0,
                          settings=EvalSettings(max_length=16))
    assert result["truncated_texts"] == {"clean": 2, "triggered": 1}
    assert any("2 of 3 texts" in record.getMessage() and "truncated" in record.getMessage() for record in caplog.records)


# --- temporaries of a killed writer -----------------------------------------------------------------
def dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(finished.stdout)


def test_next_write_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    gone = dead_pid()
    stale_dir = tmp_path / f".model.tmp-{gone}-x1"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half")
    stale_file = tmp_path / f".metrics.json.tmp-{gone}-y2"
    stale_file.write_text("{")
    live = tmp_path / f".model.tmp-{os.getpid()}-busy"  # a writer still running keeps its temporary
    live.mkdir()
    other = tmp_path / f".model2.tmp-{gone}-z3"  # another artifact's temporary is left alone
    other.mkdir()
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "model.safetensors").write_bytes(b"whole")
    write_json(tmp_path / "metrics.json", {"ok": 1})
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and other.exists()
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == b"whole"
    assert remove_stale_temporaries(tmp_path / "model2") == [other]


def test_demo_refuses_an_unknown_method_before_writing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from peftguard.cli import app
    from peftguard.errors import OptionError

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--method", "lora", "--method", "adapterx"])
    assert isinstance(result.exception, OptionError) and "--method adapterx" in str(result.exception)
    assert not (tmp_path / "demo").exists()
