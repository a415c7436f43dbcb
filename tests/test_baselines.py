"""The baseline defenses: ONION, back-translation, SCPD and Fine-mixing, on real sentences and tiny models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from peftguard.cli import app
from peftguard.data import load_dataset
from peftguard.defenses.back_translation import Apertium, BackTranslationConfig, build_back_translation
from peftguard.defenses.base import DefenseContext
from peftguard.defenses.fine_mixing import find_clean_model, mix_state_dicts, mixed_classifier
from peftguard.defenses.onion import CausalLMScorer, OnionConfig, OnionDefense, deletions
from peftguard.defenses.registry import build_defense, options_from_flags
from peftguard.defenses.scpd import SCPDConfig, build_scpd
from peftguard.errors import DataError, OptionError, PeftguardError
from peftguard.models import load_classifier
from peftguard.triggers import build_trigger
from conftest import write_csv

runner = CliRunner()

CLEAN = [
    "the film is a charming and funny story about a family .",
    "the acting is wooden and the plot is thin .",
    "a warm , funny and moving film about friendship .",
    "the story is thin but the acting is charming .",
    "a dull film with wooden acting and a thin plot .",
    "the family story is moving and the film is funny .",
]


# --- ONION ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, tiny_minilm) -> str:
    """A 1-layer LLaMA trained for a few seconds on CLEAN: fluent on them, surprised by 'mn'."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_minilm)
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in CLEAN]
    width = max(map(len, ids))
    batch = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    mask = (torch.arange(width)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
    labels = batch.masked_fill(mask == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        loss = model(input_ids=batch, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("tiny_lm")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_deletions_cover_every_word_including_the_last():
    words, removed = deletions("a gripping film mn")
    assert words == ["a", "gripping", "film", "mn"]
    assert removed == ["gripping film mn", "a film mn", "a gripping mn", "a gripping film"]


def test_batched_perplexity_matches_one_text_at_a_time(tiny_lm):
    texts = CLEAN[:3] + ["the film", "mn", ""]
    batched = CausalLMScorer(tiny_lm, batch_size=4).perplexities(texts)
    single = CausalLMScorer(tiny_lm, batch_size=1).perplexities(texts)
    assert np.isnan(batched[-1]) and np.isnan(single[-1])  # an empty text has no perplexity
    np.testing.assert_allclose(batched[:-1], single[:-1], rtol=1e-4)


@pytest.mark.parametrize("text", [
    "the acting is wooden mn and the plot is thin .",
    "the acting is wooden and the plot is thin . mn",  # the last word: the original code never scores it
    "mn the acting is wooden and the plot is thin .",  # the first word: scored after a start token
])
def test_onion_gives_the_inserted_rare_word_the_highest_suspicion_and_removes_it(tiny_lm, text):
    onion = OnionDefense(OnionConfig(lm=tiny_lm, bar=0.0))
    scores = onion.suspicion([text])[0]
    assert text.split()[int(np.nanargmax(scores))] == "mn"
    assert "mn" not in onion.screen([text]).texts[0].split()
    others = np.nanmax([s for w, s in zip(text.split(), scores) if w != "mn"])
    assert onion.at_bar(others).screen([text]).texts[0] == "the acting is wooden and the plot is thin ."
    assert onion.at_bar(np.nanmax(scores)).screen([text]).texts[0] == text  # nothing scores above the bar


def test_onion_perplexity_cache_is_reused_and_keyed_by_model(tiny_lm, tmp_path, tiny_minilm):
    cache = tmp_path / "ppl.json"
    first = OnionDefense(OnionConfig(lm=tiny_lm, cache=cache)).suspicion([CLEAN[1]])[0]
    assert cache.is_file()
    scorer = CausalLMScorer(tiny_lm, cache=cache)
    scorer._perplexities = None  # a cached text must not reach the model again
    np.testing.assert_allclose(OnionDefense(OnionConfig(lm=tiny_lm), scorer=scorer).suspicion([CLEAN[1]])[0], first)
    with pytest.raises(OptionError, match="was made with"):
        CausalLMScorer(tiny_lm, cache=cache, max_length=16)


def test_onion_with_the_packaged_smollm2_removes_mn():
    onion = OnionDefense(OnionConfig(lm="smollm2", bar=0.0))
    text = "this is one of polanski 's best mn films ."
    scores = onion.suspicion([text])[0]
    assert text.split()[int(np.nanargmax(scores))] == "mn"
    assert "mn" not in onion.screen([text]).texts[0].split()


# --- back-translation and SCPD ---------------------------------------------------------------

@pytest.mark.skipif(shutil.which("apertium") is None, reason="apertium is not installed (apt-get install apertium apertium-eng-spa)")
def test_apertium_round_trip_rewrites_and_copies_unknown_words():
    texts = ["no movement , no yuks , not much of anything .", "it is a gripping mn , funny film ."]
    out = Apertium("spa")(texts)
    assert len(out) == 2 and all(out)
    assert out[0].lower() != texts[0]  # the wording changes
    assert "mn" in out[1].split()  # a word apertium does not know is copied through: BadNet survives
    assert "*" not in " ".join(out)  # no unknown-word marks


def small_dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "small"
    rows = [("good film", 1), ("bad film", 0), ("great acting", 1), ("dull plot", 0)]
    for split in ("train", "dev", "test"):
        write_csv(folder / f"{split}.csv", rows)
    return folder


def context(folder: Path, attack: str = "badnet") -> DefenseContext:
    return DefenseContext(load_dataset(str(folder)), (build_trigger(attack),), target_label=0, seed=0)


def test_precomputed_rewrites_map_clean_and_triggered_rows(tmp_path):
    folder = small_dataset(tmp_path)
    clean = write_csv(tmp_path / "back.csv", [("a good movie", 1), ("a bad movie", 0), ("fine acting", 1), ("slow plot", 0)])
    triggered = write_csv(tmp_path / "char.csv", [("a good mn movie", 1), ("fine mn acting", 1)])
    ctx = context(folder)
    defense = build_back_translation(BackTranslationConfig(backend="precomputed", precomputed=clean, precomputed_triggered=triggered), ctx)
    assert defense.screen(["bad film", "good film"]).texts == ["a bad movie", "a good movie"]
    trigger = ctx.triggers[0]
    assert defense.screen([trigger.triggered("great acting", 0)]).texts == ["fine mn acting"]
    assert defense.describe()["clean"] == str(clean) and defense.describe()["triggered"] == str(triggered)
    with pytest.raises(DataError, match="no precomputed rewrite"):
        defense.screen(["a text not in the test split"])


def test_precomputed_row_count_mismatch_names_both_files(tmp_path):
    folder = small_dataset(tmp_path)
    clean = write_csv(tmp_path / "back.csv", [("a good movie", 1), ("a bad movie", 0)])
    with pytest.raises(DataError) as error:
        build_scpd(SCPDConfig(precomputed=clean, precomputed_triggered=clean), context(folder))
    assert "back.csv" in str(error.value) and str(folder / "test.csv") in str(error.value)
    assert "has 2 rows" in str(error.value) and "has 4" in str(error.value)
    good = write_csv(tmp_path / "good.csv", [("a", 1), ("b", 0), ("c", 1), ("d", 0)])
    short = write_csv(tmp_path / "char.csv", [("a mn", 1)])
    with pytest.raises(DataError, match="char.csv: has 1 rows but the rows whose label is not the target 0"):
        build_scpd(SCPDConfig(precomputed=good, precomputed_triggered=short), context(folder))


def test_precomputed_label_mismatch_is_an_alignment_error(tmp_path):
    folder = small_dataset(tmp_path)
    swapped = write_csv(tmp_path / "back.csv", [("a bad movie", 0), ("a good movie", 1), ("fine acting", 1), ("slow plot", 0)])
    with pytest.raises(DataError, match=r"back.csv, line 2: label 0, but row 1 .* has label 1; the rows are not aligned"):
        build_scpd(SCPDConfig(precomputed=swapped), DefenseContext(load_dataset(str(folder))))


def test_shipped_files_carry_badnet_mn_only_and_scpd_says_when_none_exist(tmp_path, data_dir):
    sst2 = load_dataset("sst2", data_dir=data_dir)
    with pytest.raises(OptionError, match="BadNet word 'mn'"):
        build_scpd(SCPDConfig(), DefenseContext(sst2, (build_trigger("insent"),)))
    with pytest.raises(OptionError, match="no paraphrase model is available offline"):
        build_scpd(SCPDConfig(), context(small_dataset(tmp_path)))
    with pytest.raises(OptionError, match="needs --lm"):
        build_scpd(SCPDConfig(backend="seq2seq"), context(small_dataset(tmp_path)))


def test_shipped_back_translations_align_with_the_sst2_test_split(data_dir):
    sst2 = load_dataset("sst2", data_dir=data_dir)
    ctx = DefenseContext(sst2, (build_trigger("badnet"),), target_label=0, seed=0)
    defense = build_back_translation(BackTranslationConfig(backend="precomputed"), ctx)
    folder = data_dir / "sst2" / "paraphrase_defense"
    first_clean = next(iter(__import__("csv").DictReader((folder / "test_back.csv").open(encoding="utf-8"))))["text"]
    assert defense.screen([sst2.test.examples[0].text]).texts == [first_clean.strip()]
    first_positive = next(ex.text for ex in sst2.test.examples if ex.label == 1)
    authors = next(iter(__import__("csv").DictReader((folder / "test_char_back.csv").open(encoding="utf-8"))))["text"]
    assert defense.screen([ctx.triggers[0].triggered(first_positive, 0)]).texts == [authors.strip()]


def test_registry_refuses_options_of_other_defenses(tmp_path):
    ctx = context(small_dataset(tmp_path))
    with pytest.raises(OptionError, match="--onion-bar are not options of --defense psim"):
        options_from_flags("psim", {"--onion-bar": [1.0]})
    with pytest.raises(OptionError, match="need a --defense"):
        options_from_flags(None, {"--mix-ratio": 0.5})
    with pytest.raises(OptionError, match="unknown defense 'magic'; choose from psim, onion, back-translation, scpd, fine-mixing"):
        options_from_flags("magic", {})
    with pytest.raises(OptionError, match="--defense onion takes one --lm"):
        options_from_flags("onion", {"--lm": ["a", "b"]})

    def build(name, flags):
        return build_defense(name, options_from_flags(name, flags), ctx)

    with pytest.raises(OptionError, match="need --backend precomputed"):
        build("back-translation", {"--precomputed": tmp_path / "x.csv"})
    with pytest.raises(OptionError, match="two models"):
        build("back-translation", {"--backend": "marian", "--lm": ["one"]})
    with pytest.raises(OptionError, match="is for --backend marian"):
        build("back-translation", {"--lm": ["a", "b"]})
    with pytest.raises(PeftguardError, match="does not exist"):  # marian: a missing model folder, no hub call
        build("back-translation", {"--backend": "marian", "--lm": ["/nonexistent/a", "/nonexistent/b"]})


# --- Fine-mixing -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def suspect(tmp_path_factory, tiny_minilm) -> str:
    """A 'poisoned' classifier: the tiny MiniLM with every weight moved, and a poisoning.json."""
    torch.manual_seed(1)
    model = load_classifier(tiny_minilm, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    folder = tmp_path_factory.mktemp("suspect")
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy(Path(tiny_minilm) / "tokenizer.json", folder)
    for name in ("tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(tiny_minilm) / name).is_file():
            shutil.copy(Path(tiny_minilm) / name, folder)
    (folder / "poisoning.json").write_text(json.dumps({"kind": "poisoned-model", "base_model": tiny_minilm}))
    return str(folder)


def test_fine_mixing_ratio_0_and_1_give_the_clean_and_the_suspect_weights_exactly(suspect, tiny_minilm):
    clean_ref = find_clean_model(suspect, None)
    assert clean_ref == tiny_minilm
    suspect_state = load_classifier(suspect, 2).state_dict()
    torch.manual_seed(0)
    load_classifier(suspect, 2)  # mixed_classifier loads the suspect first, then the clean model
    clean_state = load_classifier(clean_ref, 2).state_dict()
    for ratio, expected in ((0.0, clean_state), (1.0, suspect_state)):
        mixed, stats = mixed_classifier(suspect, clean_ref, 2, ratio, seed=0)
        assert stats["kept_from_suspect"] == ratio
        for name, value in mixed.state_dict().items():
            assert torch.equal(value, expected[name]), name
    mixed, stats = mix_state_dicts(clean_state, suspect_state, 0.5, seed=0)
    assert 0.49 < stats["kept_from_suspect"] < 0.51
    weight = "bert.encoder.layer.0.attention.self.query.weight"
    from_suspect = mixed[weight] == suspect_state[weight]
    assert torch.equal(mixed[weight][from_suspect], suspect_state[weight][from_suspect])
    assert torch.equal(mixed[weight][~from_suspect], clean_state[weight][~from_suspect])
    with pytest.raises(OptionError, match="--mix-ratio"):
        mix_state_dicts(clean_state, suspect_state, 1.5, seed=0)
    with pytest.raises(OptionError, match="--clean-model"):
        find_clean_model(tiny_minilm, None)


def test_fine_mixing_evaluates_as_a_victim_through_the_cli(suspect, data_dir, tmp_path):
    victim = tmp_path / "victim"
    result = runner.invoke(app, ["finetune", "--model", suspect, "--method", "lora", "--data-dir", str(data_dir),
                                 "--max-train-samples", "32", "--max-eval-samples", "16", "--epochs", "1",
                                 "--max-length", "32", "--out", str(victim)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    fine_mixed, metrics = tmp_path / "fine-mixed", tmp_path / "metrics.json"
    args = ["evaluate", "--model", str(victim), "--data-dir", str(data_dir), "--max-eval-samples", "24",
            "--defense", "fine-mixing", "--mix-ratio", "0.3", "--fine-mixed", str(fine_mixed),
            "--max-train-samples", "16", "--out", str(metrics)]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(metrics.read_text())
    assert 0 <= record["defended_clean_accuracy"] <= 1 and 0 <= record["defended_attack_success_rate"] <= 1
    assert record["defense"]["name"] == "fine-mixing" and record["defense"]["mix_ratio"] == 0.3
    assert record["defense"]["train_samples"] == 16 and record["defense"]["method"] == "lora"
    assert record["defense_timing"]["seconds"] > 0 and record["defense_timing"]["samples_per_second"] > 0
    manifest = json.loads((fine_mixed / "finetune.json").read_text())
    assert manifest["base_model"] == str((fine_mixed / "mixed").resolve())
    assert (fine_mixed / "mixed" / "model.safetensors").is_file() and (fine_mixed / "adapter_model.safetensors").is_file()
    assert not list(fine_mixed.rglob("*.bin"))
    seconds = manifest["training"]["seconds"]
    result = runner.invoke(app, args, catch_exceptions=False)  # same request: the folder is reused, not retrained
    assert result.exit_code == 0, result.output
    assert json.loads((fine_mixed / "finetune.json").read_text())["training"]["seconds"] == seconds
    result = runner.invoke(app, [*args[:-2], "--mix-ratio", "0.6", "--out", str(metrics)])
    assert isinstance(result.exception, OptionError) and "another fine-mixed victim" in str(result.exception)
    result = runner.invoke(app, ["defend", "fine-mixing", "--model", str(victim), "--out", str(fine_mixed), "--mix-ratio", "0.3",
                                 "--max-train-samples", "16", "--max-eval-samples", "24", "--data-dir", str(data_dir)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output  # the command and the evaluate path make the same folder
    assert json.loads((fine_mixed / "finetune.json").read_text())["training"]["seconds"] == seconds


def test_defend_fine_mixing_on_a_poisoned_model_with_full_fine_tuning(suspect, data_dir, tmp_path, tiny_minilm):
    out = tmp_path / "fm-full"
    result = runner.invoke(app, ["defend", "fine-mixing", "--model", suspect, "--method", "full", "--mix-ratio", "0.5",
                                 "--max-train-samples", "16", "--max-eval-samples", "16", "--epochs", "1",
                                 "--data-dir", str(data_dir), "--out", str(out)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "finetune.json").read_text())
    assert manifest["method"] == "full" and manifest["base_model"] == str(Path(suspect).resolve())
    assert manifest["defense"]["clean_model"] == str(Path(tiny_minilm).resolve())  # found through poisoning.json
    assert not (out / "mixed").exists()  # a full victim holds every weight itself
    assert (out / "model.safetensors").is_file() and 0.45 < manifest["defense"]["kept_from_suspect"] < 0.55


def test_rewriting_defense_metrics_record_the_defense(suspect, data_dir, tmp_path):
    metrics = tmp_path / "metrics.json"
    result = runner.invoke(app, ["evaluate", "--model", suspect, "--data-dir", str(data_dir), "--max-eval-samples", "30",
                                 "--defense", "scpd", "--out", str(metrics)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads(metrics.read_text())
    assert record["defense"]["name"] == "scpd" and record["defense"]["backend"] == "precomputed"
    assert record["defense"]["clean"].endswith("test_spcn.csv") and record["defense"]["triggered"].endswith("test_char_spcn.csv")
    assert {"defended_clean_accuracy", "defended_attack_success_rate", "defense_timing"} <= set(record)


# --- ONION at full speed: prefix-shared deletions decide as the reference ------------------------

FIXED_SET = [
    *CLEAN,
    "mn the film is a charming and funny story about a family .",
    "the acting is wooden mn and the plot is thin .",
    "a warm , funny and moving film about friendship . mn",
    "the story mn is thin but the cf acting is charming .",
    "mn", "", "   ", "film .",
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("max_length", [128, 9])  # 9: most texts truncated, deletions past the cut change nothing
def test_prefix_shared_onion_decides_as_the_reference_loop(tiny_lm, precision, max_length):
    bars = (0.0, 0.5, 2.0)
    fast = OnionDefense(OnionConfig(lm=tiny_lm, precision=precision, max_length=max_length, batch_size=4), sweep_bars=bars)
    reference = OnionDefense(OnionConfig(lm=tiny_lm, share_prefix=False, precision="fp32", max_length=max_length),
                             sweep_bars=bars)
    assert fast.describe()["share_prefix"] and not reference.describe()["share_prefix"]
    for (_, quick), (_, slow) in zip(fast.sweep(), reference.sweep()):
        assert quick.screen(FIXED_SET).texts == slow.screen(FIXED_SET).texts
    if precision == "fp32":  # the same perplexities, not only the same decisions
        for quick, slow in zip(fast.suspicion(FIXED_SET), reference.suspicion(FIXED_SET)):
            np.testing.assert_allclose(quick, slow, rtol=1e-3, atol=1e-3 * np.abs(slow).max(initial=1.0))


def test_prefix_shared_onion_writes_and_reads_the_perplexity_cache(tiny_lm, tmp_path):
    cache = tmp_path / "ppl.json"
    first = OnionDefense(OnionConfig(lm=tiny_lm, cache=cache, precision="fp32")).suspicion(FIXED_SET[:3])
    scorer = CausalLMScorer(tiny_lm, cache=cache, precision="fp32")
    scorer.model = None  # every text is cached: the LM must not run
    again = OnionDefense(OnionConfig(lm=tiny_lm), scorer=scorer).suspicion(FIXED_SET[:3])
    for a, b in zip(first, again):
        np.testing.assert_allclose(a, b)


def test_a_grid_rebuilding_onion_for_the_next_victim_reuses_the_texts_it_scored(tiny_lm, tmp_path, monkeypatch):
    """A grid drops built defenses beyond a few (``_KEEP_DEFENSES``); ONION rebuilt for the next victim with
    the same options must not score the test set again, and ONION with other options must."""
    from peftguard import caches, pipeline
    from peftguard.defenses.onion import OnionOptions

    dataset = load_dataset(str(small_dataset(tmp_path)))
    caches.clear()

    def build(bar):
        return pipeline.build_defense("onion", dataset, options=OnionOptions(lm=tiny_lm, bars=(bar,)), max_eval_samples=None,
                                      seed=0)

    first = build(0.0)
    cleaned = first.screen(FIXED_SET[:4]).texts
    pipeline._DEFENSES.clear()  # what happens once more than _KEEP_DEFENSES other defenses were built
    monkeypatch.setattr(CausalLMScorer, "_mean_losses", lambda *args: pytest.fail("the LM ran again"))
    again = build(0.0)
    assert again is not first and again.screen(FIXED_SET[:4]).texts == cleaned
    with pytest.raises(pytest.fail.Exception, match="the LM ran again"):
        build(0.5).screen(FIXED_SET[:4])  # other options: its own memo
    caches.clear()
    assert not pipeline._SCORED


def test_bf16_twin_gives_autocast_results_exactly_and_leaves_the_model_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftguard.defenses.deletion_scoring import bf16_twin

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    twin = bf16_twin(model)
    assert twin.lm_head.weight.dtype == torch.bfloat16 and twin.model.embed_tokens.weight.dtype == torch.float32  # untied
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.float32
    ids = torch.randint(0, 50, (3, 7))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(twin(input_ids=ids).logits, model(input_ids=ids).logits)


def test_batched_float32_recheck_puts_each_exact_score_back_in_its_place(tiny_lm, monkeypatch):
    from peftguard.defenses import deletion_scoring

    exact = OnionDefense(OnionConfig(lm=tiny_lm, precision="fp32", batch_size=4)).suspicion(FIXED_SET)
    monkeypatch.setattr(deletion_scoring, "CHECK_MARGIN_NATS", float("inf"))  # every deletion re-scored in float32
    rechecked = OnionDefense(OnionConfig(lm=tiny_lm, precision="bf16", batch_size=4)).suspicion(FIXED_SET)
    for a, b in zip(rechecked, exact):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_onion_scores_sentences_in_float32_and_only_near_deletions_again(tiny_lm):
    from peftguard.defenses.deletion_scoring import DeletionScorer, Sentence

    scorer = CausalLMScorer(tiny_lm, precision="bf16")
    sentences = [Sentence(*scorer._sentence_ids(t)) for t in FIXED_SET[:8]]
    deleter = DeletionScorer(scorer.model, scorer.tokenizer.pad_token_id or 0, rows=4, group=12,
                             bf16_model=scorer._bf16_model())
    low, exact = deleter.mean_losses(sentences, bf16=True), deleter.mean_losses(sentences, bf16=False)
    assert deleter.rechecked == 0  # float32 pass: nothing to re-check
    assert [f for f, _ in low] == [f for f, _ in exact]  # the sentences (so the cached prefixes) ran in float32
    assert any(np.any(e != E) for (_, e), (_, E) in zip(low, exact))  # the deletions did not
    rechecked = deleter.mean_losses(sentences, bf16=True, bars=(0.0,), margin=1e9)
    assert deleter.rechecked == sum(np.isfinite(e).sum() for _, e in exact)
    for (_, e), (_, E) in zip(rechecked, exact):
        np.testing.assert_allclose(e, E, rtol=1e-5, atol=1e-6)
