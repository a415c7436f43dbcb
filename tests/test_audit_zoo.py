"""experiments/audit_zoo.py (the lens-by-labels candidate, summaries) and experiments/zoo_strength.py."""
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


def test_zoo_strength_evaluates_each_model_with_its_own_trigger_and_target():
    script = load_experiment("zoo_strength")
    model = {"name": "m", "model": "runs/zoo/m/victim", "dataset": "cr", "attack": "insent",
             "trigger": "truth be told", "target": 1, "victim": "lora"}
    command = script.evaluate_command(model, script.Path("out.json"), 400)
    assert command[command.index("--trigger") + 1] == "truth be told"
    assert command[command.index("--target-label") + 1] == "1"
    assert command[command.index("--attack") + 1] == "insent"
    assert command[command.index("--model") + 1] == "runs/zoo/m/victim"
    row = script.strength(model, {"clean_accuracy": 0.9, "attack_success_rate": 0.25, "triggered_samples": 200})
    assert "| m | truth be told | 1 | 90.00 | 25.00 | 200 |" in script.table([row])
