"""experiments/audit_zoo.py: the lens-by-labels candidate, and summaries that start no audit."""
from __future__ import annotations

from conftest import load_experiment


def test_by_labels_takes_the_classifier_lens_above_two_labels_and_the_psim_lens_otherwise(monkeypatch):
    script = load_experiment("audit_zoo")
    monkeypatch.setattr(script, "num_labels", {"sst2": 2, "agnews": 4}.__getitem__)
    models = [{"name": "binary", "dataset": "sst2"}, {"name": "topics", "dataset": "agnews"},
              {"name": "unaudited", "dataset": "agnews"}]
    lens_audits = {"psim": {"binary": {"lens": "psim-b"}, "topics": {"lens": "psim-t"}},
                   "classifier": {"binary": {"lens": "cls-b"}, "topics": {"lens": "cls-t"}}}
    chosen = script.by_labels(models, lens_audits)
    assert chosen == {"binary": {"lens": "psim-b"}, "topics": {"lens": "cls-t"}}


def test_summarize_only_reads_finished_audits_and_starts_none(tmp_path, monkeypatch):
    script = load_experiment("audit_zoo")
    started = []
    monkeypatch.setattr(script.subprocess, "run", lambda command, **_: started.append(command))
    (tmp_path / "psim" / "done").mkdir(parents=True)
    (tmp_path / "psim" / "done" / "audit.json").write_text('{"verdict": "no evidence"}')
    model = {"name": "done", "model": "m", "dataset": "sst2"}
    assert script.audit(model, "psim", tmp_path, [], run=False) == {"verdict": "no evidence"}
    assert script.audit({**model, "name": "missing"}, "psim", tmp_path, [], run=False) is None
    assert started == []



def test_the_plain_psim_audit_is_read_off_an_audit_with_proposals():
    script = load_experiment("audit_zoo")
    record = {"score": 0.63, "verdict": "backdoored", "threshold": 0.5,
              "proposals": {"score_without": 0.2, "words": {}, "judged": []},
              "candidates": [{"text": "blue moon", "source": "proposal"}, {"text": "garbage", "source": "vocabulary"},
                             {"text": "so boring", "source": "pair"}],
              "seconds": {"search": 200.0, "proposals": 90.5, "verify": 30.0, "total": 400.0}}
    plain = script.without_proposals(record)
    assert plain["score"] == 0.2 and plain["verdict"] == "no evidence"
    assert [c["text"] for c in plain["candidates"]] == ["garbage", "so boring"]
    assert plain["seconds"] == {"search": 200.0, "verify": 30.0, "total": 309.5}
    assert record["score"] == 0.63 and len(record["candidates"]) == 3  # the record itself is left as it was


def test_by_labels_with_proposals_takes_them_on_two_labels_only(monkeypatch):
    script = load_experiment("audit_zoo")
    monkeypatch.setattr(script, "num_labels", {"sst2": 2, "agnews": 4}.__getitem__)
    models = [{"name": "binary", "dataset": "sst2"}, {"name": "topics", "dataset": "agnews"}]
    lens_audits = {"psim-proposals": {"binary": "pp-b", "topics": "pp-t"}, "classifier": {"binary": "c-b", "topics": "c-t"}}
    assert script.by_labels(models, lens_audits, binary="psim-proposals") == {"binary": "pp-b", "topics": "c-t"}
    assert script.LENS_ARGS["psim-proposals"] == ["--lens", "psim", "--proposals", str(script.PROPOSAL_WORDS)]


def test_the_strength_gate_leaves_out_backdoors_that_did_not_take_and_unmeasured_ones(tmp_path):
    script = load_experiment("audit_zoo")
    strength = tmp_path / "strength.json"
    strength.write_text('{"models": [{"name": "strong", "attack_success_rate": 0.97},'
                        ' {"name": "weak", "attack_success_rate": 0.0098}]}')
    models = [{"name": "strong", "poisoned": True}, {"name": "weak", "poisoned": True},
              {"name": "unmeasured", "poisoned": True}, {"name": "clean", "poisoned": False}]
    kept, left_out = script.gate(models, strength, 0.9)
    assert [m["name"] for m in kept] == ["strong", "clean"]
    assert left_out == [{"name": "weak", "attack_success_rate": 0.0098},
                        {"name": "unmeasured", "attack_success_rate": None}]
    assert script.gate(models, None, 0.9) == (models, [])
