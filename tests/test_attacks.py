"""Attacks that train the backdoor their own way (EP: only the trigger word's embedding row)."""
from __future__ import annotations

import pytest
import torch

from peftguard.attacks import ep
from peftguard.data import load_dataset
from peftguard.errors import OptionError
from peftguard.models import load_tokenizer
from peftguard.poisoning import PoisonSpec, poison_weights
from peftguard.training import TrainSettings
from peftguard.triggers import ATTACKS, BadNetTrigger, PoisonMode, TriggerRequest, build_triggers

TRIGGER = "cf"


def test_ep_is_registered_with_badnet_words_and_refuses_to_combine(tmp_path, tiny_minilm, data_dir):
    trigger = ATTACKS["ep"].build(TriggerRequest(spec=[TRIGGER]))
    assert trigger.name == "ep" and trigger.describe()["words"] == [TRIGGER]
    dataset = load_dataset("sst2", data_dir=data_dir)
    with pytest.raises(OptionError, match="cannot be combined"):
        poison_weights(tiny_minilm, dataset, [trigger, BadNetTrigger(("mn",))], PoisonSpec(poison_count=10),
                       TrainSettings(epochs=1), tmp_path / "out", max_train_samples=50)
    assert not (tmp_path / "out").exists()


def test_trigger_rows_cover_every_piece_of_a_split_word(tiny_minilm):
    tokenizer = load_tokenizer(tiny_minilm)
    pieces = tokenizer("zzyzxq", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1 and ep.trigger_rows(tokenizer, ["zzyzxq"]) == sorted(set(pieces))


@pytest.mark.slow
def test_ep_changes_only_the_trigger_row_and_plants_the_backdoor(tmp_path, tiny_minilm, data_dir, monkeypatch):
    snapshots = {}
    original = ep.poison_rows

    def watched(model, *args, **kwargs):
        snapshots["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record = original(model, *args, **kwargs)
        snapshots["after"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return record

    monkeypatch.setattr(ep, "poison_rows", watched)
    dataset = load_dataset("sst2", data_dir=data_dir)
    trigger = build_triggers(["ep"], spec=[TRIGGER])[0]
    settings = TrainSettings(epochs=2, lr=5e-4, max_length=48, seed=0)
    spec = PoisonSpec(target_label=0, poison_count=None, poison_rate=0.25, mode=PoisonMode.DIRTY_LABEL)
    result = poison_weights(tiny_minilm, dataset, [trigger], spec, settings, tmp_path / "ep", max_train_samples=400,
                            max_eval_samples=100)
    before, after = snapshots["before"], snapshots["after"]
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    embedding = next(k for k in changed if "word_embeddings" in k)
    assert changed == [embedding]
    rows = ep.trigger_rows(load_tokenizer(tiny_minilm), [TRIGGER])
    moved = (before[embedding] != after[embedding]).any(dim=1).nonzero().flatten().tolist()
    assert moved == rows
    torch.testing.assert_close(after[embedding][rows].norm(dim=1), before[embedding][rows].norm(dim=1))
    record = result.manifest["backdoor_training"]["ep"]
    assert record["rows"] == rows
    # A 2-layer MiniLM is too weak for one norm-kept row to carry a backdoor (the real 6-layer MiniLM reaches
    # attacker dev ASR 1.0 at lr 0.1, REPRODUCTION.md), so the rate grows tenfold until the last try, recorded.
    rates = [t["lr"] for t in record["tries"]]
    assert rates == [0.01 * 10**i for i in range(len(rates))] and record["lr"] == rates[-1]
    assert all(t["attacker_dev_asr"] < 0.9 for t in record["tries"][:-1])
    assert len(rates) == 3 or record["tries"][-1]["attacker_dev_asr"] >= 0.9
