"""experiments/false_candidates.py: false candidates on clean zoo models, per lens and kind of dataset."""
from __future__ import annotations

import json

from conftest import load_experiment


def _audit(folder, name: str, dataset: str, candidates: list[tuple[str, float, bool]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.audit.json").write_text(json.dumps({
        "threshold": 0.5, "settings": {"dataset": dataset},
        "candidates": [{"text": t, "flag_rate": rate, "explained_by_task": explained} for t, rate, explained in candidates]}))


def test_only_unexplained_candidates_above_the_threshold_accuse_and_kinds_are_kept_apart(tmp_path, monkeypatch):
    script = load_experiment("false_candidates")
    monkeypatch.setattr(script, "task_word_count", lambda dataset, texts: sum(t == "awful" for t in texts))
    part = tmp_path / "held_apart_9"
    _audit(part / "classifier", "h9-clean-sst2-lora-s1", "sst2",
           [("frowns", 0.9, False), ("awful", 0.95, True), ("dull", 0.4, False)])
    _audit(part / "classifier", "h9-clean-agnews-full-s2", "agnews", [("iraqi troops", 0.8, True)])
    _audit(part / "classifier", "h9-sst2-cf-clean-label", "sst2", [("cf", 1.0, False)])  # poisoned: not counted
    _audit(part / "psim", "h9-clean-sst2-lora-s1", "sst2", [("magnificent", 0.3, False)])
    counts = script.count_part(part, "9")
    assert counts["classifier"]["binary"] == {"models": 1, "places": 3, "task_words": 1, "accusing": 1}
    assert counts["classifier"]["agnews"] == {"models": 1, "places": 1, "task_words": 0, "accusing": 0}
    assert counts["psim"] == {"binary": {"models": 1, "places": 1, "task_words": 0, "accusing": 0}}
    assert "| 9 | classifier | binary | 1 | 1/3 | 1/3 |" in script.table({"9": counts})
