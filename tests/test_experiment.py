"""Experiment configs, grid planning, stage reuse, the local and Ray executors, and reports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftguard.config import load_config, parse_config
from peftguard.errors import DataError, OptionError
from peftguard.experiment import StageError, plan_grid, run_local, run_parallel, run_ray, stage_dir, write_plan
from peftguard.report import write_report

from conftest import REPO


@pytest.mark.parametrize("raw, message", [
    ({"name": "x", "grid": {"methodz": ["lora"]}}, "grid.methodz: unknown key; valid keys here: attacks, datasets, defenses, methods"),
    ({"name": "x", "grid": {"methods": ["adapter"]}}, "grid.methods.0: unknown method 'adapter'; choose from full, lora, prompt, ptuning-v1, ptuning-v2"),
    ({"name": "x", "psim": {"epochs": "many"}}, "psim.epochs: Input should be a valid integer"),
    ({"name": "x", "sweep": {"victim.normal": [True]}}, "cannot sweep 'victim.normal'"),
    ({"name": "x", "grid": {"models": ["smollm2"], "methods": ["ptuning-v2"]}}, "ptuning-v2 is not run on decoders"),
    ({"name": "x", "grid": {"scenarios": ["full-task"], "datasets": ["agnews"]}}, "proxies has no entry for ['agnews']"),
    ({"grid": {}}, "name: Field required"),
])
def test_bad_configs_name_the_key(raw, message):
    with pytest.raises(OptionError) as error:
        parse_config(raw, "c.yaml")
    assert message in str(error.value) and str(error.value).startswith("c.yaml: ")


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ngrid: [unclosed\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.yaml, line \d+"):
        load_config(path)


def test_every_shipped_config_is_valid():
    configs = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.name.startswith("_"))  # _*: shared bases
    configs.append(REPO / "src" / "peftguard" / "demo.yaml")  # the demo's, shipped in the package
    assert configs, "configs/ has no YAML files"
    for path in configs:
        plan = plan_grid(load_config(path))
        assert plan.cells, path


def test_stage_keys_change_only_with_their_settings():
    base = {"name": "x", "grid": {"methods": ["lora", "full"]}}
    plan = plan_grid(parse_config(base))
    changed_victim = plan_grid(parse_config({**base, "victim": {"epochs": 5}}))
    kinds = lambda p, kind: {n for n in p.stages if n.startswith(kind)}  # noqa: E731
    assert kinds(plan, "poison") == kinds(changed_victim, "poison")
    assert kinds(plan, "psim") == kinds(changed_victim, "psim")
    assert kinds(plan, "victim").isdisjoint(kinds(changed_victim, "victim"))
    # Shared stages appear once: one poisoned model and one PSIM serve both methods.
    assert len(kinds(plan, "poison")) == 1 and len(kinds(plan, "psim")) == 1


def test_sweeps_and_multi_trigger_expand_cells():
    config = parse_config({"name": "x", "grid": {"attacks": [["badnet", "insent"]], "defenses": ["psim"]},
                           "sweep": {"psim.reset_rate": [0.5, 1.0], "evaluate.gamma": [0.6, 0.7, 0.8]},
                           "victim": {"normal": False}})
    plan = plan_grid(config)
    assert len([n for n in plan.stages if n.startswith("psim")]) == 2
    assert len(plan.cells) == 6 and {c["attack"] for c in plan.cells} == {"badnet+insent"}


def tiny_grid(tiny_minilm: str, data_dir: Path) -> dict:
    return {
        "name": "tiny", "table": "Table 2 (layout)",
        "grid": {"models": [tiny_minilm], "methods": ["lora"], "defenses": ["none", "psim"]},
        "data": {"max_train_samples": 80, "max_eval_samples": 40, "data_dir": str(data_dir)},
        "poison": {"epochs": 1, "lr": 5e-4, "poison_mode": "dirty-label", "poison_rate": 0.2, "max_length": 48},
        "victim": {"epochs": 1, "max_length": 48, "normal": True},
        "psim": {"max_length": 48}, "evaluate": {"max_length": 48},
    }


def metrics_of(run_dir: Path, plan) -> dict[str, dict]:
    out = {}
    for cell in plan.cells:
        metrics = json.loads((stage_dir(run_dir, cell["stage"]) / "metrics.json").read_text())
        out[cell["stage"]] = {k: v for k, v in metrics.items() if "timing" not in k and k not in ("model", "defense")}
    return out


@pytest.mark.slow
def test_local_run_reuses_finished_stages_and_ray_and_workers_give_the_same_metrics(tmp_path, tiny_minilm, data_dir):
    ray = pytest.importorskip("ray")
    config = parse_config(tiny_grid(tiny_minilm, data_dir))
    plan = plan_grid(config)
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    write_plan(local_dir, config, plan)
    first = run_local(local_dir, plan, threads=1, echo=lambda m: None)
    assert first == {"ran": len(plan.stages), "reused": 0}
    marks = {n: (stage_dir(local_dir, n) / "stage.json").stat().st_mtime_ns for n in plan.stages}
    again = run_local(local_dir, plan, threads=1, echo=lambda m: None)
    assert again == {"ran": 0, "reused": len(plan.stages)}
    assert marks == {n: (stage_dir(local_dir, n) / "stage.json").stat().st_mtime_ns for n in plan.stages}

    write_plan(ray_dir, config, plan)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        counts = run_ray(ray_dir, plan, cpus_per_stage=1, echo=lambda m: None)
    finally:
        ray.shutdown()
    assert counts["ran"] == len(plan.stages)
    assert metrics_of(ray_dir, plan) == metrics_of(local_dir, plan)

    # Worker processes give the same metrics; a model that does not exist fails its chain only.
    raw = tiny_grid(tiny_minilm, data_dir)
    raw["grid"]["models"] = [tiny_minilm, str(tmp_path / "no-such-model")]
    with_broken = parse_config(raw)
    parallel_plan = plan_grid(with_broken)
    parallel_dir = tmp_path / "parallel"
    write_plan(parallel_dir, with_broken, parallel_plan)
    with pytest.raises(StageError, match=r"stages failed or were skipped \(first: poison-"):
        run_parallel(parallel_dir, parallel_plan, workers=2, threads=1, echo=lambda m: None)
    broken = {n for n, s in parallel_plan.stages.items() if "no-such-model" in json.dumps(s.settings)
              or any("no-such-model" in json.dumps(parallel_plan.stages[d].settings) for d in s.deps)}
    assert broken and not any((stage_dir(parallel_dir, n) / "stage.json").exists() for n in broken)
    assert metrics_of(parallel_dir, plan) == metrics_of(local_dir, plan)  # the good model's stages all ran
    log_text = (parallel_dir / "run.log").read_text()
    assert log_text.count("FAILED poison-") == 1 and "ran evaluate-" in log_text

    written = {p.name for p in write_report(local_dir)}
    assert {"results.md", "results.csv", "results.tex", "cells.csv", "confidence_histograms.png", "roc_curves.png"} <= written
    table = (local_dir / "report" / "results.md").read_text()
    assert "| Normal |" in table and "| Attack |" in table and "| Defense |" in table


def test_cells_csv_gives_each_defense_cost_per_1000_inputs():
    from peftguard.report import long_rows

    cells = [{"attack": "badnet", "defense": "strip", "row": "defense", "stage": "evaluate-a",
              "metrics": {"clean_accuracy": 0.9, "defense_timing": {"seconds": 4.0, "samples_per_second": 50.0}}},
             {"attack": "badnet", "defense": "none", "row": "attack", "stage": "evaluate-b", "metrics": {"clean_accuracy": 0.9}}]
    header, rows = long_rows(cells)
    cost = header.index("defense_seconds_per_1000_inputs")
    assert [row[cost] for row in rows] == [20.0, ""] and header[-1] == "stage"


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from peftguard.errors import PeftguardError  # noqa: E402

_config_texts = st.one_of(
    st.binary(max_size=300).map(lambda b: b),
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.dictionaries(st.sampled_from(["name", "grid", "psim", "sweep", "data", "bogus"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.text(max_size=5), max_size=3)),
                    max_size=4).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=_config_texts)
def test_config_reader_parses_or_fails_with_one_clear_line(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    try:
        config = load_config(path)
    except PeftguardError as error:
        message = str(error)
        assert "\n" not in message and "c.yaml" in message
    else:
        assert config.name


def test_deeply_nested_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: " + "[" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="deep.yaml.*invalid YAML"):
        load_config(path)


@pytest.mark.slow
def test_grid_baseline_rows_measure_fine_mixing_and_show_a_refused_defense_as_na(tmp_path, tiny_minilm, data_dir):
    raw = tiny_grid(tiny_minilm, data_dir)
    raw["grid"] |= {"attacks": ["insent"], "defenses": ["none", "scpd", "fine-mixing"]}
    raw["victim"]["normal"] = False
    config = parse_config(raw)
    plan = plan_grid(config)
    run_dir = tmp_path / "run"
    write_plan(run_dir, config, plan)
    run_local(run_dir, plan, threads=1, echo=lambda m: None)
    by_defense = {c["defense"]: json.loads((stage_dir(run_dir, c["stage"]) / "metrics.json").read_text()) for c in plan.cells}
    assert "insent" in by_defense["scpd"]["refused"]  # the shipped SCPN files carry BadNet's word only
    mixed = by_defense["fine-mixing"]
    assert mixed["defense"]["name"] == "fine-mixing" and mixed["defense"]["mix_ratio"] == mixed["defense"]["selection"]["chosen"]
    assert 0 <= mixed["defended_clean_accuracy"] <= 1 and 0 <= mixed["defended_attack_success_rate"] <= 1
    write_report(run_dir)
    table = (run_dir / "report" / "results.md").read_text()
    assert "| Defense (scpd: SCPN paraphrases of the PSIM authors) | n/a | n/a |" in table
    assert "n/a: scpd refused insent:" in table  # with the reason
    assert (f"| Defense (fine-mixing: ratio chosen on clean dev, victim's fine-tuning replayed) | "
            f"{100 * mixed['defended_clean_accuracy']:.2f} |") in table
