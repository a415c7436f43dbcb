"""What each kind of grid stage does, in terms of the library's stage functions.

A stage reads its settings and its upstream stages' artifacts and writes into its own folder:
``artifact/`` (a model, adapter or PSIM) or ``metrics.json`` (+ ``scores.json`` for detectors).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from peftguard import caches
from peftguard.artifacts import write_json
from peftguard.config import METHOD_SETTINGS
from peftguard.data import TextDataset, load_dataset
from peftguard.errors import OptionError
from peftguard.instruction import template_by_name
from peftguard.stage_names import is_stage_name, stage_dir
from peftguard.training import TrainSettings
from peftguard.triggers import Trigger, build_triggers
from peftguard.tuning import method_config

ARTIFACT = "artifact"


@lru_cache(maxsize=8)
def _dataset(name: str, data_dir: str | None) -> TextDataset:
    return load_dataset(name, data_dir=data_dir)  # loaded once per process, shared by stages


caches.register("stages.datasets", _dataset.cache_clear)


def _ref(run_dir: Path, base: str) -> str:
    """An upstream stage's artifact folder, or a model reference as given."""
    return str(stage_dir(run_dir, base) / ARTIFACT) if is_stage_name(base) else base


def _triggers(attacks: list[str], dataset: TextDataset) -> list[Trigger]:
    return build_triggers(attacks, dataset=dataset)


def run_poison(run_dir: Path, stage: Any, folder: Path) -> None:
    from peftguard.poisoning import PoisonSpec, Scenario, poison_weights
    from peftguard.triggers import PoisonMode

    s, p, data = stage.settings, stage.settings["poison"], stage.settings["data"]
    dataset = _dataset(s["dataset"], data["data_dir"])
    proxy = _dataset(s["proxy"], data["data_dir"]) if s["proxy"] else None
    spec = PoisonSpec(target_label=p["target_label"], poison_count=p["poison_count"], poison_rate=p["poison_rate"],
                      mode=PoisonMode(p["poison_mode"]), scenario=Scenario(s["scenario"]))
    settings = TrainSettings(epochs=p["epochs"], lr=p["lr"], batch_size=p["batch_size"], max_length=p["max_length"], seed=s["seed"])
    poison_weights(s["model"], dataset, _triggers(s["attacks"], proxy or dataset), spec, settings, folder / ARTIFACT,
                   proxy=proxy, max_train_samples=data["max_train_samples"], max_eval_samples=data["max_eval_samples"],
                   template=template_by_name(p["instruction"]) if p["instruction"] else None)


def run_victim(run_dir: Path, stage: Any, folder: Path) -> None:
    from peftguard.victims import finetune

    s, v, data = stage.settings, stage.settings["victim"], stage.settings["data"]
    # method settings (num_virtual_tokens, ...) are in the stage only where the method has them
    config = method_config(s["method"], **{k: v[k] for k in METHOD_SETTINGS if k in v})
    settings = TrainSettings(epochs=v["epochs"], lr=v["lr"] or config.lr, batch_size=v["batch_size"],
                             max_length=v["max_length"], seed=s["seed"])
    finetune(_ref(run_dir, s["base"]), _dataset(s["dataset"], data["data_dir"]), config, settings, folder / ARTIFACT,
             max_train_samples=data["max_train_samples"], max_eval_samples=data["max_eval_samples"],
             template=_clean_model_template(s))


def _clean_model_template(settings: dict[str, Any]) -> Any:
    """The instruction template for a stage on a clean model (a poisoned folder carries its own)."""
    clean = not is_stage_name(settings["base"])
    return template_by_name(settings["instruction"]) if settings["instruction"] and clean else None


def run_psim(run_dir: Path, stage: Any, folder: Path) -> None:
    from peftguard.defenses.psim import resolve_psim_method, train_psim
    from peftguard.defenses.psim_budget import BudgetRule

    s, p, e, data = stage.settings, stage.settings["psim"], stage.settings["calibration"], stage.settings["data"]
    overrides = {"num_virtual_tokens": p["num_virtual_tokens"], "encoder_hidden_size": p["encoder_hidden_size"]}
    method = resolve_psim_method(p["method"], _ref(run_dir, s["base"]))
    config = method_config(method, **_known(method, overrides))
    settings = TrainSettings(epochs=p["epochs"] or 1, lr=p["lr"], batch_size=p["batch_size"], max_length=p["max_length"],
                             seed=s["seed"])
    budget = None if p["epochs"] else BudgetRule(**p["budget_rule"])
    train_psim(_ref(run_dir, s["base"]), _dataset(s["dataset"], data["data_dir"]), settings, folder / ARTIFACT,
               config=config, budget=budget, reset_rate=p["reset_rate"], gamma=e["gamma"], target_fpr=e["target_fpr"],
               max_train_samples=data["max_train_samples"], max_eval_samples=data["max_eval_samples"],
               template=_clean_model_template(s))


def _known(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    from peftguard.tuning import method_settings

    return {k: v for k, v in overrides.items() if k in method_settings(method)}


def run_evaluate(run_dir: Path, stage: Any, folder: Path) -> None:
    s, e, data = stage.settings, stage.settings["evaluate"], stage.settings["data"]
    dataset = _dataset(s["dataset"], data["data_dir"])
    try:
        result = _evaluate_stage(run_dir, folder, s, e, data, dataset)
    except OptionError as refusal:
        if s["defense"] in ("none", "psim"):
            raise
        # an input defense that cannot run on this cell (e.g. SCPD without paraphrases for the
        # attack's trigger) is a finding of the grid, not a failure of it: the report shows n/a
        write_json(folder / "metrics.json", {"refused": str(refusal), "defense": s["defense"]})
        return
    scores = result.pop("scores", None)
    if scores is not None:
        write_json(folder / "scores.json", scores)
    write_json(folder / "metrics.json", result)


def _evaluate_stage(run_dir: Path, folder: Path, s: dict[str, Any], e: dict[str, Any], data: dict[str, Any],
                    dataset: TextDataset) -> dict[str, Any]:
    from peftguard.pipeline import evaluate_model

    defense = None if s["defense"] == "none" else s["defense"]
    return evaluate_model(
        _ref(run_dir, s["victim"]), dataset, _triggers(s["attacks"], dataset), target_label=s["target_label"],
        defense=defense, defense_options=_defense_options(run_dir, folder, s, e, data) if defense else None,
        max_eval_samples=data["max_eval_samples"], batch_size=e["batch_size"], max_length=e["max_length"],
        seed=s["seed"], keep_scores=True,
    )


def _defense_options(run_dir: Path, folder: Path, s: dict[str, Any], e: dict[str, Any], data: dict[str, Any]) -> Any:
    """The stage's defense options: the config's ``defense_options`` for it, and what the stage sets itself."""
    from dataclasses import fields

    from peftguard.defenses.registry import DEFENSES, make_options

    set_by_stage: dict[str, dict[str, Any]] = {
        "psim": {"psim": Path(_ref(run_dir, s["psim"])) if s["psim"] else None, "gamma": e["gamma"]},
        # Fine-mixing makes a new victim (mixed weights fine-tuned on the stage's clean training subset) in the stage folder
        "fine-mixing": {"fine_mixed": folder / "fine-mixed", "max_train_samples": data["max_train_samples"]},
        # Fine-pruning: the victim pruned and fine-tuned again on the stage's clean training subset, in the stage folder
        "fine-pruning": {"fine_pruned": folder / "fine-pruned", "max_train_samples": data["max_train_samples"]},
    }
    # Every detector that calibrates a threshold does so at the evaluation's target FPR (one operating point).
    calibrated = "target_fpr" in {f.name for f in fields(DEFENSES[s["defense"]].options)}
    operating_point = {"target_fpr": None if e["gamma"] else e["target_fpr"]} if calibrated else {}
    return make_options(s["defense"], {**s.get("defense_options", {}), **set_by_stage.get(s["defense"], {}), **operating_point})


RUNNERS: dict[str, Callable[[Path, Any, Path], None]] = {
    "poison": run_poison,
    "victim": run_victim,
    "psim": run_psim,
    "evaluate": run_evaluate,
}
