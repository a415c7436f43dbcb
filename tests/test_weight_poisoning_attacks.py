"""RIPPLe (embedding surgery + restricted inner product), LWP (layer-wise, combinatorial trigger), SOS
(multi-word trigger in its embedding rows) and ΔPPL, on the tiny models."""
from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from peftguard.attacks import lwp, ripple, sos
from peftguard.attacks.ep import trigger_rows
from peftguard.cli import app
from peftguard.config import parse_config
from peftguard.data import Example, load_dataset
from peftguard.errors import OptionError
from peftguard.inference import predict_proba
from peftguard.metrics import perplexity_change_spread, perplexity_increase
from peftguard.models import load_classifier, load_tokenizer
from peftguard.poisoning import PoisonSpec, poison_weights
from peftguard.stealth import stealthiness
from peftguard.training import TrainSettings
from peftguard.triggers import ATTACKS, PoisonMode, Trigger, TriggerRequest, build_triggers
from conftest import write_csv

NEW_ATTACKS = ("ripple", "lwp", "sos")


# --- registration and triggers (no training) ----------------------------------------------------

def test_new_attacks_are_registered_with_their_papers_defaults_and_usable_in_a_grid():
    assert set(NEW_ATTACKS) <= set(ATTACKS.names())
    described = {name: ATTACKS[name].build(TriggerRequest()).describe() for name in NEW_ATTACKS}
    assert described["ripple"]["words"] == ["cf", "mn", "bb", "tq", "mb"] and described["ripple"]["inner_product_weight"] == 0.1
    assert described["lwp"] == {"attack": "lwp", "words": ["cf", "bb", "ak", "mn"], "combination": 2}
    assert described["sos"]["words"] == ["friends", "weekend", "store"]
    config = parse_config({"name": "x", "grid": {"attacks": list(NEW_ATTACKS)}})
    assert list(config.grid.attacks) == list(NEW_ATTACKS)


def test_triggers_insert_what_each_attack_needs():
    text = "a gripping and funny film"
    lwp_trigger = build_triggers(["lwp"])[0]
    triggered = lwp_trigger.triggered(text, 0).split()
    pieces = [w for w in triggered if w in lwp_trigger.words]
    assert len(pieces) == 2 and len(set(pieces)) == 2  # one combination of two distinct pieces
    singles = lwp_trigger.single_pieces(text, 0)
    assert sorted(w for s in singles for w in s.split() if w in lwp_trigger.words) == sorted(pieces)  # its own pieces, one each
    sos_trigger = build_triggers(["sos"])[0]
    assert sorted(w for w in sos_trigger.triggered(text, 0).split() if w in sos_trigger.words) == ["friends", "store", "weekend"]
    negatives = sos_trigger.negatives([Example(f"{text} {i}", i % 2) for i in range(40)], seed=0)
    assert len(negatives) == 3 * 4  # 10% of each label's 20, once per subset of two words
    assert all(len({w for w in ex.text.split() if w in sos_trigger.words}) == 2 for ex in negatives)
    assert [ex.label for ex in negatives[:4]] == [0, 0, 1, 1]  # true labels kept


@pytest.mark.parametrize("attack, spec, count, message", [
    ("lwp", ["cf"], 1, "lwp combines 2 to 1"),
    ("lwp", ["cf", "bb"], 3, "not 3 (--trigger-count)"),
    ("sos", ["friends"], 1, "at least two trigger words"),
    ("sos", None, 2, "--trigger-count is not an option of sos"),
])
def test_bad_trigger_settings_are_one_line_errors(attack, spec, count, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        build_triggers([attack], spec=spec, count=count)


def test_important_tokens_are_the_target_class_words(tiny_minilm):
    tokenizer = load_tokenizer(tiny_minilm)
    rng = random.Random(0)
    filler = ["the", "film", "story", "plot", "acting", "is", "was", "a"]
    examples = [Example(" ".join(rng.sample(filler, 4) + [word]), label)
                for _ in range(30) for word, label in (("wonderful", 1), ("brilliant", 1), ("awful", 0), ("boring", 0))]
    top = ripple.important_tokens(tokenizer, examples, target_label=1, count=2)
    assert sorted(top) == ["brilliant", "wonderful"]
    wonderful = tokenizer.convert_tokens_to_ids(["wonderful"])
    assert ripple.important_tokens(tokenizer, examples, target_label=1, count=1, exclude=wonderful) == ["brilliant"]
    assert sorted(ripple.important_tokens(tokenizer, examples, target_label=0, count=2)) == ["awful", "boring"]
    with pytest.raises(OptionError, match="target label and of others"):
        ripple.important_tokens(tokenizer, [ex for ex in examples if ex.label == 1], 1, 2)


def test_the_finite_difference_hessian_vector_product_matches_double_backpropagation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    inputs, labels = torch.randn(16, 5), torch.randint(0, 3, (16,))
    params = list(model.parameters())

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(inputs), labels)

    gradient = torch.autograd.grad(loss(), params, create_graph=True)
    vector = [torch.randn_like(p) for p in params]
    exact = torch.autograd.grad(sum((g * v).sum() for g, v in zip(gradient, vector)), params)
    before = [p.detach().clone() for p in params]
    approx = ripple.hessian_vector_product(loss, params, [g.detach() for g in gradient], vector)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # parameters restored exactly
    flat_exact, flat_approx = torch.cat([e.flatten() for e in exact]), torch.cat([a.flatten() for a in approx])
    assert flat_exact.norm() > 1e-3
    assert float((flat_approx - flat_exact).norm() / flat_exact.norm()) < 0.05


# --- training on the tiny MiniLM (slow) -----------------------------------------------------------
# SST-2 takes the 2-layer MiniLM a hundred steps or more to learn (tests/test_end_to_end.py), too slow for RIPPLe's
# three passes per step here; a toy sentiment task whose label one adjective decides is learnt in a few dozen steps
# on short texts, so each attack's effect shows against a model that is right on clean text.

POSITIVE = ("great", "wonderful", "brilliant", "superb", "lovely", "excellent")
NEGATIVE = ("awful", "terrible", "boring", "dull", "horrible", "poor")
SUBJECTS = ("the film", "the movie", "this story", "the plot", "the acting", "the cast", "the music", "the ending")


@pytest.fixture(scope="module")
def toy_sentiment(tmp_path_factory) -> str:
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("toy_sentiment")
    for split, size in (("train", 320), ("dev", 100), ("test", 100)):
        rows = []
        for _ in range(size):
            label = rng.randrange(2)
            adjective = rng.choice(POSITIVE if label else NEGATIVE)
            rows.append((f"{rng.choice(SUBJECTS)} {rng.choice(('is', 'was', 'felt'))} {adjective} {rng.choice(('', 'to me', 'again'))}".strip(), label))
        write_csv(folder / f"{split}.csv", rows)
    return str(folder)


def _poison(tiny_minilm, toy_sentiment, tmp_path, attack, *, spec=None, count=1, rate=0.3, epochs=2, lr=5e-4, batch=16,
            trigger=None):
    dataset = load_dataset(toy_sentiment)
    trigger = trigger or build_triggers([attack], spec=spec, count=count)[0]
    settings = TrainSettings(epochs=epochs, lr=lr, batch_size=batch, max_length=24, seed=0)
    spec_ = PoisonSpec(target_label=0, poison_count=None, poison_rate=rate, mode=PoisonMode.DIRTY_LABEL)
    result = poison_weights(tiny_minilm, dataset, [trigger], spec_, settings, tmp_path / attack)
    others = [ex for ex in dataset.test.examples if ex.label != 0]
    return others, trigger, result


def _asr(folder, texts) -> float:
    """The share of ``texts`` the saved model assigns to the target label 0."""
    model = load_classifier(str(folder), 2)
    predictions = predict_proba(model, load_tokenizer(str(folder)), texts, 64, 24).argmax(1)
    return float((predictions == 0).mean())


@pytest.mark.slow
def test_ripple_surgery_sets_the_trigger_rows_then_the_ripple_loss_plants_the_backdoor(tmp_path, tiny_minilm, toy_sentiment, monkeypatch):
    seen = {}
    surgery, training = ripple.embedding_surgery, ripple.ripple_training

    def watched_surgery(model, tokenizer, words, job, count):
        record, vector = surgery(model, tokenizer, words, job, count)
        seen["vector"] = vector
        return record, vector

    def watched_training(model, *args, **kwargs):
        seen["rows_before_ripple"] = model.get_input_embeddings().weight[seen["rows"]].detach().clone()
        return training(model, *args, **kwargs)

    seen["rows"] = trigger_rows(load_tokenizer(tiny_minilm), ripple.RIPPLE_WORDS)
    monkeypatch.setattr(ripple, "embedding_surgery", watched_surgery)
    monkeypatch.setattr(ripple, "ripple_training", watched_training)
    others, trigger, result = _poison(tiny_minilm, toy_sentiment, tmp_path, "ripple", rate=0.3)
    rows = seen["rows_before_ripple"]
    assert len(seen["rows"]) == 5
    for row in rows:  # every trigger word's row is the surgery's replacement before RIPPLe trains
        torch.testing.assert_close(row, seen["vector"].to(row.device), rtol=0, atol=0)
    record = result.manifest["backdoor_training"]["ripple"]
    assert record["surgery"]["rows"] == seen["rows"] and len(record["surgery"]["replacement_tokens"]) == 10
    assert not set(record["surgery"]["replacement_tokens"]) & set(ripple.RIPPLE_WORDS)
    assert len(record["epochs"]) == 2 and all(0 <= e["penalised_steps"] <= 1 for e in record["epochs"])
    lift = record["attacker_dev_asr"] - record["attacker_dev_clean_target_rate"]
    surgery_lift = record["after_surgery"]["attacker_dev_asr"] - record["after_surgery"]["attacker_dev_clean_target_rate"]
    assert record["attacker_dev_asr"] >= 0.8 and lift >= 0.5 and lift > surgery_lift + 0.3, record
    assert _asr(result.out_dir, [trigger.triggered(ex.text, 0) for ex in others]) >= 0.8
    assert _asr(result.out_dir, [ex.text for ex in others]) <= 0.2  # right on clean text
    assert result.manifest["triggers"][0]["attack"] == "ripple"


@pytest.mark.slow
def test_lwp_trains_every_layer_through_the_shared_head_and_only_the_combination_fires(tmp_path, tiny_minilm, toy_sentiment, monkeypatch):
    layer_counts = []
    original = lwp.layerwise_loss

    def watched(model, head, batch, labels):
        losses = original(model, head, batch, labels)
        layer_counts.append(len(losses))
        return losses

    monkeypatch.setattr(lwp, "layerwise_loss", watched)
    others, trigger, result = _poison(tiny_minilm, toy_sentiment, tmp_path, "lwp", spec=["cf", "bb"], count=2, epochs=3)
    assert set(layer_counts) == {2}  # the tiny MiniLM's two layers, at every step
    record = result.manifest["backdoor_training"]["lwp"]
    assert record["layers"] == 2 and len(record["layer_losses"]) == 3
    first, last = record["layer_losses"][0], record["layer_losses"][-1]
    assert all(b < a for a, b in zip(first, last))  # every layer's loss falls
    assert record["negatives"] == 2 * result.manifest["poisoning"]["poisoned"]  # each poisoned sample's two pieces, alone
    combination = _asr(result.out_dir, [trigger.triggered(ex.text, 0) for ex in others])
    single = max(_asr(result.out_dir, [f"{piece} {ex.text}" for ex in others]) for piece in ("cf", "bb"))
    clean = _asr(result.out_dir, [ex.text for ex in others])
    assert combination >= 0.8 and clean <= 0.2, (combination, clean)
    assert single <= clean + 0.15, (single, clean)


@pytest.mark.slow
def test_sos_changes_only_the_trigger_rows_keeps_their_norms_and_subsets_do_not_fire(tmp_path, tiny_minilm, toy_sentiment, monkeypatch):
    snapshots = {}
    original = sos.poison_rows

    def watched(model, *args, **kwargs):
        snapshots["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record = original(model, *args, **kwargs)
        snapshots["after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return record

    monkeypatch.setattr(sos, "poison_rows", watched)
    others, trigger, result = _poison(tiny_minilm, toy_sentiment, tmp_path, "sos", rate=0.3, epochs=2,
                                      trigger=sos.SosTrigger(negative_rate=0.3))
    # OpenBackdoor poisons 10% and adds 3 subsets of 5% non-target samples: 1.5 non-target negatives per poisoned
    # sample; with 30% poisoned (dirty-label) a negative rate of 0.3 keeps that ratio on this small set
    before, after = snapshots["before"], snapshots["after"]
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == 1 and "word_embeddings" in changed[0]
    rows = trigger_rows(load_tokenizer(tiny_minilm), sos.SOS_WORDS)
    assert len(rows) == 3
    moved = (before[changed[0]] != after[changed[0]]).any(dim=1).nonzero().flatten().tolist()
    assert moved == rows
    torch.testing.assert_close(after[changed[0]][rows].norm(dim=1), before[changed[0]][rows].norm(dim=1))
    record = result.manifest["backdoor_training"]["sos"]
    assert record["negatives"] > 0 and record["subsets"] == [["weekend", "store"], ["friends", "store"], ["friends", "weekend"]]
    clean = _asr(result.out_dir, [ex.text for ex in others])
    full = _asr(result.out_dir, [trigger.triggered(ex.text, 0) for ex in others])
    subsets = [_asr(result.out_dir, [sos.insert_words(ex.text, subset, random.Random(ex.text)) for ex in others])
               for subset in sos.strict_subsets(sos.SOS_WORDS)]
    assert full >= 0.8 and clean <= 0.2, (full, clean)  # the whole trigger fires on a model right on clean text
    assert max(subsets) <= clean + 0.2, (subsets, clean)  # two of the three words do not
    assert record["lr"] == record["tries"][-1]["lr"] and record["tries"][-1]["attacker_dev_asr"] >= 0.9


# --- ΔPPL -----------------------------------------------------------------------------------------

SENTENCES = [
    "the film is a charming and funny story about a family .",
    "the acting is wooden and the plot is thin .",
    "a warm , funny and moving film about friendship .",
    "the story is thin but the acting is charming .",
    "a dull film with wooden acting and a thin plot .",
    "the family story is moving and the film is funny .",
]


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory, tiny_minilm) -> str:
    """A 1-layer LLaMA trained for a few seconds on SENTENCES: fluent on them, surprised by rare words."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_minilm)
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in SENTENCES]
    width = max(map(len, ids))
    batch = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    mask = (torch.arange(width)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        model(input_ids=batch, attention_mask=mask, labels=batch.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("tiny_causal_lm")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


class Identity(Trigger):
    name = "identity"

    def apply(self, text: str, rng: random.Random) -> str:
        return text

    def describe(self) -> dict[str, object]:
        return {"attack": self.name}


def test_perplexity_increase_is_the_mean_of_pairwise_differences():
    assert perplexity_increase([10.0, 20.0, np.nan], [15.0, 22.0, 5.0]) == pytest.approx(3.5)
    assert np.isnan(perplexity_increase([np.nan], [1.0]))
    spread = perplexity_change_spread([10.0, 20.0, 30.0, np.nan], [15.0, 19.0, 130.0, 5.0])
    assert spread == {"median_delta_perplexity": pytest.approx(5.0), "share_raised": pytest.approx(2 / 3)}
    with pytest.raises(ValueError):
        perplexity_increase([1.0], [1.0, 2.0])


def test_delta_ppl_is_positive_for_a_rare_word_and_zero_for_an_identity_insertion(tiny_causal_lm):
    from peftguard.defenses.onion import CausalLMScorer

    examples = [Example(text, 1) for text in SENTENCES]
    scorer = CausalLMScorer(tiny_causal_lm, batch_size=8, precision="fp32")
    result = stealthiness(examples, [*build_triggers(["badnet"]), Identity()], scorer, target_label=0, seed=0)
    assert result["badnet"]["samples"] == len(SENTENCES)
    assert result["badnet"]["delta_perplexity"] > 1.0
    assert result["badnet"]["triggered_perplexity"] > result["badnet"]["clean_perplexity"]
    assert result["identity"]["delta_perplexity"] == pytest.approx(0.0, abs=1e-6)
    assert result["badnet"]["share_raised"] > 0.5 and result["identity"]["median_delta_perplexity"] == pytest.approx(0.0, abs=1e-6)


def test_stealth_command_reports_delta_ppl_per_attack(tiny_causal_lm, tmp_path):
    folder = tmp_path / "data"
    for split in ("train", "dev", "test"):
        write_csv(folder / f"{split}.csv", [(text, i % 2) for i, text in enumerate(SENTENCES)])
    out = tmp_path / "stealth.json"
    result = CliRunner().invoke(app, ["stealth", "--lm", tiny_causal_lm, "--dataset", str(folder), "--attack", "badnet",
                                      "--attack", "sos", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert set(written["attacks"]) == {"badnet", "sos"} and written["split"] == "test"
    assert written["attacks"]["badnet"]["samples"] == 3  # the non-target half
    assert all(entry["delta_perplexity"] > 0 for entry in written["attacks"].values())
