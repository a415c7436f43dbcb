"""experiments/zoo.py: the audit listing is on disk before any model is built, so audits can follow a build."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, load_experiment


def test_zoo_json_lists_every_entry_before_the_first_build_runs(tmp_path, monkeypatch):
    zoo = load_experiment("zoo")
    config = tmp_path / "zoo.yaml"
    config.write_text(
        "defaults: {max_train_samples: 8, max_length: 16, poison_rate: 0.2, poison_epochs: 1, poison_lr: 5.0e-5,"
        " victim_epochs: 1}\n"
        "models:\n"
        "  - {name: a, part: development, dataset: sst2, attack: badnet, trigger: cf, mode: clean-label, target: 0}\n"
        "  - {name: b, part: held-apart, dataset: cr, clean: lora, seed: 1}\n",
        encoding="utf-8",
    )
    out = tmp_path / "zoo"
    seen_at_first_build = []

    def first_build_fails(command, check):
        seen_at_first_build.append(json.loads((out / "zoo.json").read_text(encoding="utf-8")))
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(zoo.subprocess, "run", first_build_fails)
    monkeypatch.setattr(sys, "argv", ["zoo.py", str(config), "--out", str(out), "--only", "a"])
    with pytest.raises(subprocess.CalledProcessError):
        zoo.main()
    listing = seen_at_first_build[0]
    assert [m["name"] for m in listing] == ["a", "b"]
    assert listing[0]["model"] == str(out / "a" / "poisoned") and listing[1]["model"] == str(out / "b" / "victim")


def test_a_dry_run_writes_nothing(tmp_path, monkeypatch, capsys):
    zoo = load_experiment("zoo")
    out = tmp_path / "zoo"
    monkeypatch.setattr(sys, "argv", ["zoo.py", str(REPO / "experiments" / "zoo.yaml"), "--out", str(out),
                                      "--only", "h4-sst2-ek", "--dry-run"])
    zoo.main()
    assert "--trigger ek" in capsys.readouterr().out
    assert not out.exists()
