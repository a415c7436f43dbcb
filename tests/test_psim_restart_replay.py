"""experiments/psim_restart_replay.py: replaying rule v4 on recorded searches agrees with what v4 did when it ran."""
from __future__ import annotations

import json

from conftest import REPO, load_experiment

GRID_SEED7 = REPO / "results/psim_score_agnews/cells/agnews-badnet-full-data-seed7-defense-psim-ptuning-v1/psim.json"
V4_RUN_SEED7 = REPO / "results/psim_restart_dev/agnews-badnet-seed7.json"


def manifest(values: list[float], search_steps: int, num_labels: int = 4) -> dict:
    rule = {"target_share": 0.2, "settle_share": 0.5, "max_epochs": 4, "min_budget_steps": 200, "checks_per_epoch": 8,
            "flat_patience": 3, "flat_tolerance": 0.01, "flat_min_window": 24, "flat_min_steps": 64, "monitor_samples": 256}
    trajectory = [{"step": 8 * i, "mean_confidence": v} for i, v in enumerate(values)]
    return {"num_labels": num_labels, "settings": {"warmup_ratio": 0.06},
            "budget": {"rule": rule, "steps_per_epoch": 63, "search_stopped_at_step": search_steps, "trajectory": trajectory}}


def test_a_search_reaching_chance_within_one_epoch_is_not_replayed_as_a_restart():
    replay = load_experiment("psim_restart_replay").replay
    assert replay(manifest([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.42, 0.39], search_steps=56)) is None
    assert replay(manifest([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.42, 0.41, 0.39], search_steps=64)) is None  # at 64 exactly


def test_a_search_above_the_target_at_one_epoch_is_replayed_as_a_restart_there():
    replay = load_experiment("psim_restart_replay").replay
    assert replay(manifest([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.42, 0.41, 0.405, 0.39], search_steps=72)) == 64


def test_the_replay_matches_the_v4_run_on_the_same_cell():
    """The grid's v2 PSIM of AG News seed 7 replays to a restart at 64, and v4, run on that cell with the same seed,
    abandoned its first try at 64 after the very same clean trajectory."""
    v2 = json.loads(GRID_SEED7.read_text(encoding="utf-8"))
    abandoned = json.loads(V4_RUN_SEED7.read_text(encoding="utf-8"))["psim"]["budget"]["abandoned_tries"][0]
    assert load_experiment("psim_restart_replay").replay(v2) == 64 == abandoned["stopped_at_step"]
    assert abandoned["stop_reason"] == "restart"
    searched = [(p["step"], p["mean_confidence"]) for p in v2["budget"]["trajectory"] if p["step"] <= 64]
    assert searched == [(p["step"], p["mean_confidence"]) for p in abandoned["trajectory"]]
