"""experiments/audit_parts_summary.py: lenses across held-apart parts, pooled, with the strength gate."""
from __future__ import annotations

import json

import pytest
from conftest import load_experiment


def _part(tmp_path, name: str, rows: list[tuple[str, str, str | None, float]],
          top5: dict[str, list[str]] | None = None):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"models": [{"name": n, "lens": lens, "trigger": trigger, "score": score,
                                            "verdict": "backdoored" if score > 0.5 else "no evidence",
                                            "top5": (top5 or {}).get(n, ["awful", "great"])}
                                           for n, lens, trigger, score in rows]}))
    return path


def test_pooled_over_the_parts_a_lens_audited_whole_and_gated_by_measured_strength(tmp_path, monkeypatch, capsys):
    script = load_experiment("audit_parts_summary")
    first = _part(tmp_path, "first", [("a", "psim", "cf", 0.9), ("b", "psim", None, 0.1), ("c", "psim", "ae", 0.05),
                                      ("a", "classifier", "cf", 1.0)])  # the classifier lens audited 1 of 3: not pooled
    second = _part(tmp_path, "second", [("d", "psim", "mb", 0.2), ("e", "psim", None, 0.3),
                                        ("f", "psim", "by and large", 0.9)],
                   top5={"d": ["awful", "mb"], "f": ["largely", "large by"]})
    strength = tmp_path / "strength.json"
    strength.write_text(json.dumps({"models": [{"name": "a", "attack_success_rate": 1.0},
                                               {"name": "c", "attack_success_rate": 0.0098}]}))
    out = tmp_path / "parts.md"
    monkeypatch.setattr("sys.argv", ["x", "--part", f"1={first}", "--part", f"2={second}", "--strength", f"1={strength}",
                                     "--out", str(out)])
    script.main()
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    assert set(results["all models"]) == {"psim"}  # no part has every model under the classifier lens
    everything = results["all models"]["psim"]["pooled"]
    assert everything["models"] == 6 and everything["auroc"] == pytest.approx(5 / 8)  # cf and f above both clean
    gated = results["gated"]["psim"]
    assert gated["1"]["models"] == 2 and gated["1"]["auroc"] == 1.0  # the unplanted `ae` left out
    assert gated["2"]["models"] == 3  # a part without a strength file keeps every model
    # recovery: `mb` second (top 5, not top 1); `cf` and `ae` not listed; the sentence found through `large`, not
    # through `largely`
    assert everything["badnet_top1"] == [0, 3] and everything["badnet_top5"] == [1, 3]
    assert everything["insent_word_top5"] == [1, 1]
    assert gated["pooled"] == {"models": 5, "poisoned": 3, "auroc": pytest.approx(5 / 6), "clean_called_backdoored": 0,
                               "clean": 2, "poisoned_caught": 2, "badnet_top1": [0, 2], "badnet_top5": [1, 2],
                               "insent_word_top5": [1, 1]}
    assert "| gated | psim | pooled | 5 | 0.833 | 0/2 | 2/3 | 0/2 | 1/2 | 1/1 |" in capsys.readouterr().out


def test_a_part_must_be_given_as_part_equals_file():
    script = load_experiment("audit_parts_summary")
    with pytest.raises(SystemExit, match="PART=FILE"):
        script.numbered(["results.json"], "--part")
