"""Every method on every architecture family the README names: it trains and predicts, or it is refused
up front with one line naming the architecture, the method and the reason.

The README's architecture matrix is the one table of expected outcomes: ``test_readme_matrix_...``
checks each of its cells against what :mod:`peftguard.architectures` decides for a tiny model of that
family, and ``test_each_method_...`` checks that decision against a real run (fine-tune two steps,
save, load, predict), and that every refusal is one that peft alone would hit too.
The tiny models are random-initialised from configs (2 layers, hidden 32) and share the packaged
MiniLM tokenizer, with ``vocab_size`` matched to it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import peft
import pytest
import torch
import transformers
from typer.testing import CliRunner

from peftguard.architectures import (
    UnsupportedMethodError,
    check_model_supports,
    lora_target_modules,
    lora_target_names,
)
from peftguard.errors import OptionError, PeftguardError
from peftguard.tuning import method_config

README = Path(__file__).resolve().parents[1] / "README.md"
MATRIX_HEADING = "## Architectures"
# The paper's five methods (IA3, registered later to show the registry, is not in the matrix yet).
METHODS = ["full", "lora", "prompt", "ptuning-v1", "ptuning-v2"]
VOCAB = 30522  # the MiniLM tokenizer's
ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=130, pad_token_id=0)


def _configs() -> dict[str, Callable[[], transformers.PretrainedConfig]]:
    from transformers import (BertConfig, DebertaV2Config, DistilBertConfig, LlamaConfig, MPNetConfig,
                              RobertaConfig)

    return {
        "BERT": lambda: BertConfig(**ENCODER),
        "RoBERTa": lambda: RobertaConfig(**ENCODER),
        "MPNet": lambda: MPNetConfig(**ENCODER),
        # as DeBERTa-v3 is configured: relative attention in both directions, no absolute positions
        "DeBERTa-v2": lambda: DebertaV2Config(**ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                              position_biased_input=False, position_buckets=64),
        "DistilBERT": lambda: DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                               max_position_embeddings=128, pad_token_id=0),
        "Llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     pad_token_id=0),
    }


ARCHITECTURES = list(_configs())


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A folder per architecture: the bare model (no head, like a downloaded encoder) and the MiniLM tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    from peftguard.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    assert len(tokenizer) == VOCAB
    folders = {}
    for name, make_config in _configs().items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(f"tiny_{name.lower()}")
        AutoModel.from_config(make_config()).save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        folders[name] = str(folder)
    return folders


def decided_cell(folder: str, method: str) -> str:
    """What peftguard decides for ``method`` on this model, written as a README matrix cell."""
    from peftguard.models import load_classifier

    try:
        check_model_supports(folder, method, method_config(method))
    except UnsupportedMethodError as refusal:
        return f"refused: {refusal.reason}"
    if method == "lora":
        return f"works ({', '.join(lora_target_modules(load_classifier(folder, 2)))})"
    return "works"


def readme_matrix() -> tuple[list[str], dict[str, list[str]], str]:
    """(method columns, cells per architecture, the stack line) of the README's architecture matrix."""
    text = README.read_text(encoding="utf-8")
    section = text.split(MATRIX_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|") and not line.startswith("|-")]
    header, body = rows[0], rows[1:]
    stack = re.search(r"transformers (\d[\w.]*\d) and peft (\d[\w.]*\d)", section)
    assert stack, "the matrix section must say which transformers and peft it was measured with"
    return header[1:], {row[0].split(" (")[0]: row[1:] for row in body}, f"{stack[1]} {stack[2]}"


def test_readme_matrix_matches_what_peftguard_decides(tiny_models):
    columns, rows, stack = readme_matrix()
    assert columns == METHODS and list(rows) == ARCHITECTURES
    if stack != f"{transformers.__version__} {peft.__version__}":
        pytest.skip(f"the README matrix was measured with transformers/peft {stack}; this is "
                    f"{transformers.__version__} {peft.__version__}")
    decided = {name: [decided_cell(tiny_models[name], method) for method in METHODS] for name in ARCHITECTURES}
    assert rows == decided


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_method_trains_and_predicts_or_is_refused_before_training(architecture, method, tiny_models, tiny_dataset,
                                                                       tmp_path, monkeypatch):
    from peftguard import victims
    from peftguard.data import load_dataset
    from peftguard.inference import predict_proba
    from peftguard.training import TrainSettings
    from peftguard.tuning import load_tuned

    folder, out = tiny_models[architecture], tmp_path / "victim"
    decided = decided_cell(folder, method)
    trained = []
    real_train = victims.train_classifier
    monkeypatch.setattr(victims, "train_classifier", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    settings = TrainSettings(epochs=1, batch_size=4, max_length=16, seed=0)
    data = load_dataset(str(tiny_dataset))
    try:
        victims.finetune(folder, data, method_config(method), settings, out, max_train_samples=8, max_eval_samples=4)
    except UnsupportedMethodError as refusal:
        message = str(refusal)
        assert decided == f"refused: {refusal.reason}"
        assert "\n" not in message and method in message and refusal.architecture.split(" ")[0] in message
        assert not trained and not out.exists()
        assert_peft_alone_fails(folder, method)  # the refusal replaces a failure, it does not forbid a working run
        return
    assert decided.startswith("works"), f"peftguard decided '{decided}' but training went through"
    model, tokenizer, manifest = load_tuned(out, victims.MANIFEST)
    assert manifest["training"]["steps"] == 2
    probabilities = predict_proba(model, tokenizer, [ex.text for ex in data.test.examples[:4]], 4, 16)
    assert probabilities.shape == (4, 2) and np.isfinite(probabilities).all()
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def assert_peft_alone_fails(folder: str, method: str) -> None:
    from peftguard.models import load_classifier

    base, ids = load_classifier(folder, 2), torch.tensor([[101, 2204, 102]])
    with pytest.raises((ValueError, TypeError, AttributeError, RuntimeError)):  # at wrapping or at the first forward
        peft.get_peft_model(base, method_config(method).peft_config())(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_lora_targets_come_from_peft_table_else_from_layer_names(tiny_models):
    from peftguard.models import load_classifier

    assert lora_target_modules(load_classifier(tiny_models["DeBERTa-v2"], 2)) == ["query_proj", "value_proj"]  # peft's table
    assert lora_target_modules(load_classifier(tiny_models["MPNet"], 2)) == ["q", "v"]  # not in peft's table
    assert lora_target_modules(load_classifier(tiny_models["DistilBERT"], 2)) == ["q_lin", "v_lin"]


def test_an_architecture_without_known_projections_asks_for_lora_target_modules():
    class Mixer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = transformers.PretrainedConfig()
            self.token_mix = torch.nn.Linear(4, 4)

    with pytest.raises(OptionError) as refusal:
        lora_target_modules(Mixer())
    message = str(refusal.value)
    assert "\n" not in message and "Mixer" in message and "--lora-target-modules" in message and "token_mix" in message


@pytest.mark.parametrize("given, parsed", [("value, query", ("query", "value")), (["q", "q", "k"], ("k", "q")), (None, None)])
def test_lora_target_module_names_are_parsed_sorted(given, parsed):
    assert lora_target_names(given) == parsed


@pytest.mark.parametrize("given", ["", "q,,v", " , ", 5, ["q", 3]])
def test_bad_lora_target_module_names_are_refused_naming_the_flag(given):
    with pytest.raises(OptionError, match="--lora-target-modules"):
        lora_target_names(given)


def test_new_head_layers_train_with_a_peft_method(tiny_models):
    """DistilBERT's pre_classifier and DeBERTa's pooler are new with the head: left frozen they would stay random."""
    from peftguard.models import load_classifier
    from peftguard.tuning import make_tunable

    for name, layer in (("DistilBERT", "pre_classifier"), ("DeBERTa-v2", "pooler")):
        model = make_tunable(load_classifier(tiny_models[name], 2), method_config("prompt"))
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert any(f"{layer}.modules_to_save" in n for n in trainable), (name, sorted(trainable))


runner = CliRunner()


def test_cli_refuses_before_reading_the_dataset(tiny_models, tmp_path):
    from peftguard.cli import app

    result = runner.invoke(app, ["finetune", "--model", tiny_models["MPNet"], "--out", str(tmp_path / "x"),
                                 "--method", "ptuning-v2", "--dataset", str(tmp_path / "no-such-dataset")])
    assert isinstance(result.exception, UnsupportedMethodError), result.output
    assert "MPNetForSequenceClassification" in str(result.exception) and "ptuning-v2" in str(result.exception)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", [["finetune", "--method", "lora"], ["psim", "train", "--method", "lora"]])
def test_cli_refuses_a_lora_target_module_the_model_lacks(command, tiny_models, tmp_path):
    from peftguard.cli import app

    result = runner.invoke(app, [*command, "--model", tiny_models["MPNet"], "--out", str(tmp_path / "x"),
                                 "--lora-target-modules", "q,query", "--dataset", str(tmp_path / "no-such-dataset")])
    assert isinstance(result.exception, OptionError), result.output
    assert "--lora-target-modules" in str(result.exception) and "no linear layer named query" in str(result.exception)


def test_lora_target_modules_override_reaches_the_adapter_and_the_manifest(tiny_models, tiny_dataset, tmp_path):
    from peftguard.artifacts import read_json
    from peftguard.cli import app

    out = tmp_path / "victim"
    result = runner.invoke(app, ["finetune", "--model", tiny_models["MPNet"], "--out", str(out), "--method", "lora",
                                 "--lora-target-modules", "q,k", "--dataset", str(tiny_dataset), "--epochs", "1",
                                 "--batch-size", "4", "--max-length", "16", "--max-train-samples", "4"])
    assert result.exit_code == 0, result.output
    assert read_json(out / "adapter_config.json")["target_modules"] == ["k", "q"]
    assert read_json(out / "finetune.json")["method_config"]["target_modules"] == ["k", "q"]


def test_a_lora_setting_given_to_another_method_is_refused():
    with pytest.raises(PeftguardError, match="has no setting"):
        method_config("ptuning-v1", target_modules="q,v")


def test_prompt_methods_need_inputs_embeds_and_a_hidden_size():
    from peft import PromptTuningConfig

    from peftguard.architectures import NO_HIDDEN_SIZE, NO_INPUTS_EMBEDS, unsupported_reason

    class IdsOnly(torch.nn.Module):
        def __init__(self, config: transformers.PretrainedConfig) -> None:
            super().__init__()
            self.config = config

        def forward(self, input_ids=None):  # noqa: ANN201 - a stand-in architecture
            return input_ids

    class Embeds(IdsOnly):
        def forward(self, input_ids=None, inputs_embeds=None):  # noqa: ANN201
            return inputs_embeds

    prompt = PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5)
    assert unsupported_reason(IdsOnly(transformers.PretrainedConfig(hidden_size=8)), prompt) == NO_INPUTS_EMBEDS
    assert unsupported_reason(Embeds(transformers.PretrainedConfig()), prompt) == NO_HIDDEN_SIZE
    assert unsupported_reason(Embeds(transformers.PretrainedConfig(hidden_size=8)), prompt) is None
