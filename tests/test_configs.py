"""Config files: ``include:`` inheritance, no restated defaults in configs/, and the grid features the
demo needs (null sweep values, victim sweeps, the poisoned-model row)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from peftguard.config import included_values, load_config, merge_config, parse_config, read_yaml_mapping
from peftguard.errors import DataError, OptionError
from peftguard.experiment import grid_size, plan_grid
from peftguard.report import paper_table, row_label

from conftest import REPO

SHIPPED = [*sorted((REPO / "configs").glob("*.yaml")), REPO / "src" / "peftguard" / "demo.yaml"]


def restated(own: dict[str, Any], inherited: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys of ``own`` whose value equals the inherited one (mappings compared key by key)."""
    found = []
    for key, value in own.items():
        where = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(inherited.get(key), dict):
            found += restated(value, inherited[key], f"{where}.")
        elif key in inherited and inherited[key] == value:
            found.append(where)
    return found


def test_restated_finds_an_inherited_value() -> None:
    assert restated({"data": {"max_train_samples": 600, "max_eval_samples": 5}}, {"data": {"max_train_samples": 600}}) == [
        "data.max_train_samples"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_no_config_restates_a_value_it_inherits(path: Path) -> None:
    defaults = parse_config({"name": "defaults"}).model_dump(exclude={"name"})
    inherited = merge_config(defaults, included_values(path))
    own = {k: v for k, v in read_yaml_mapping(path).items() if k != "include"}
    assert restated(own, inherited) == [], f"{path.name} restates what it inherits"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_include_is_relative_to_the_including_file_and_the_file_wins(tmp_path: Path) -> None:
    (tmp_path / "bases").mkdir()
    write(tmp_path / "bases", "base.yaml", "data: {max_train_samples: 50, max_eval_samples: 20}\ngrid: {methods: [full]}\n")
    child = write(tmp_path, "child.yaml", "include: bases/base.yaml\nname: c\ndata: {max_eval_samples: 10}\n")
    config = load_config(child)
    assert (config.data.max_train_samples, config.data.max_eval_samples, config.grid.methods) == (50, 10, ["full"])


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "name: c\ndata: {max_train_samples: 50}\n")
    config = load_config(path, {"data.max_train_samples": 7, "grid.methods": ["lora", "full"]})
    assert config.data.max_train_samples == 7 and config.grid.methods == ["lora", "full"]


def test_an_include_cycle_is_one_line_naming_the_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "include: b.yaml\nname: a\n")
    write(tmp_path, "b.yaml", "include: a.yaml\n")
    with pytest.raises(DataError) as error:
        load_config(tmp_path / "a.yaml")
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "b.yaml")) and "cycle" in message


def test_a_missing_include_is_one_line_naming_both_files(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", "include: [nowhere.yaml]\nname: a\n")
    with pytest.raises(DataError, match=r"a\.yaml: include: 'nowhere\.yaml' is not a file"):
        load_config(path)


def test_an_included_file_with_a_bad_key_names_the_including_config(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "data: {max_train_sampels: 5}\n")
    path = write(tmp_path, "a.yaml", "include: base.yaml\nname: a\n")
    with pytest.raises(OptionError, match=r"a\.yaml: data\.max_train_sampels: unknown key"):
        load_config(path)


def test_null_sweep_values_stand_for_the_default_and_sort_first() -> None:
    config = parse_config({"name": "x", "poisoned_model": True, "sweep": {"evaluate.gamma": [0.7, None]}})
    plan = plan_grid(config)
    gammas = [c.get("evaluate.gamma", "-") for c in plan.cells if c["row"] == "defense"]
    assert gammas == [0.7, None] and len(plan.cells) == grid_size(config)[0]
    cells = [{**c, "metrics": {"clean_accuracy": 0.5, "attack_success_rate": 0.9, "defended_clean_accuracy": 0.4,
                              "defended_attack_success_rate": 0.1}} for c in plan.cells]
    _, rows = paper_table(cells)
    labels = [row[4] for row in rows]
    assert labels == ["Normal", "Attack", "Defense [gamma=calibrated]", "Defense [gamma=0.7]", "Poisoned (before fine-tuning)"]
    assert rows[-1][5:] == ["50.00", "90.00"]  # the poisoned weights, before any method fine-tunes them


def test_victim_sweeps_make_victims_only_for_methods_that_have_the_setting() -> None:
    config = parse_config({"name": "x", "grid": {"methods": ["lora", "ptuning-v1"], "defenses": ["none"]},
                           "victim": {"normal": False},
                           "sweep": {"victim.num_virtual_tokens": [5, 10], "victim.lr": [1e-3, None]}})
    plan = plan_grid(config)
    victims = [s.settings for s in plan.stages.values() if s.kind == "victim"]
    assert sum(v["method"] == "lora" for v in victims) == 2  # lr only: a LoRA victim has no virtual tokens
    assert sum(v["method"] == "ptuning-v1" for v in victims) == 4
    assert all("num_virtual_tokens" not in v["victim"] for v in victims if v["method"] == "lora")
    assert len(plan.cells) == grid_size(config)[0] == 8
    assert row_label(plan.cells[-1]) == "Attack [num_virtual_tokens=10, lr=method default]"  # in the sweep's order


def test_victim_normal_cannot_be_swept() -> None:
    with pytest.raises(OptionError, match="cannot sweep 'victim.normal'"):
        parse_config({"name": "x", "sweep": {"victim.normal": [True, False]}})


def test_the_demo_config_is_the_demo() -> None:
    from peftguard.demo import DEMO_CONFIG

    assert DEMO_CONFIG.is_file()  # inside the package: an installed peftguard has it too
    config = load_config(DEMO_CONFIG)
    assert config.poisoned_model and config.sweep == {"evaluate.gamma": [None, 0.7]}
    assert config.grid.methods == ["full", "lora", "prompt", "ptuning-v1", "ptuning-v2"]
    assert (config.grid.models, config.grid.datasets, config.grid.attacks, config.grid.scenarios) == (
        ["minilm"], ["sst2"], ["badnet"], ["full-data"])


def test_a_gamma_sweep_does_not_repeat_another_defenses_evaluation() -> None:
    config = parse_config({"name": "x", "grid": {"defenses": ["none", "psim", "onion"]}, "victim": {"normal": False},
                           "sweep": {"evaluate.gamma": [None, 0.7], "evaluate.batch_size": [16, 64]}})
    plan = plan_grid(config)
    onion = [c for c in plan.cells if c.get("defense") == "onion"]
    assert [c.get("evaluate.batch_size") for c in onion] == [16, 64] and all("evaluate.gamma" not in c for c in onion)
    assert sum(c.get("defense") == "psim" for c in plan.cells) == 4
    assert len(plan.cells) == grid_size(config)[0] == 7


# Configs without the paper's PSIM: smoke.yaml takes the default (auto), psim_lora_demo.yaml measures a LoRA PSIM,
# psim_v3b_smollm2_seed3.yaml and psim_v3b_smollm2_full.yaml measure the default (auto) on a decoder.
UNPINNED_CONFIGS = {"smoke.yaml", "psim_lora_demo.yaml", "psim_v3b_smollm2_seed3.yaml", "psim_v3b_smollm2_full.yaml"}


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.name not in UNPINNED_CONFIGS and not p.name.startswith("_")],
                         ids=lambda p: p.name)
def test_results_measured_with_the_papers_psim_keep_it_after_the_default_moved(path: Path) -> None:
    """Every recorded config still builds the PSIM it was measured with (and the stage keys its caches have),
    now that a config without a PSIM method gets ``auto``."""
    from peftguard.defenses.psim_budget import PAPER_PSIM_METHOD

    config = load_config(path)
    assert PAPER_PSIM_METHOD in config.sweep.get("psim.method", [config.psim.method]), path.name


def test_the_psim_method_default_is_auto_in_the_grid_and_the_cli() -> None:
    import inspect

    from peftguard.cli import psim_train
    from peftguard.config import PSIMConfig
    from peftguard.defenses.psim_budget import AUTO_PSIM_METHOD

    assert PSIMConfig().method == AUTO_PSIM_METHOD == "auto"
    assert inspect.signature(psim_train).parameters["method"].default == AUTO_PSIM_METHOD
