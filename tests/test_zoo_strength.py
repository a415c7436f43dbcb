"""experiments/zoo_strength.py: each poisoned zoo model is evaluated with its own trigger and target."""
from __future__ import annotations

from conftest import load_experiment


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
