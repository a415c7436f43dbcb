"""The baselines at their strongest faithful setting, named in every report row: back-translation through the
PSIM authors' round trips, Fine-mixing's ratio chosen on clean dev data, SCPD's refusal shown with its reason."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from peftguard.config import load_config, parse_config
from peftguard.data import load_dataset
from peftguard.defenses import fine_mixing
from peftguard.defenses.back_translation import BackTranslationConfig, build_back_translation
from peftguard.defenses.base import DefenseContext
from peftguard.defenses.fine_mixing import FineMixingConfig, FineMixingDefense, RatioSearch
from peftguard.defenses.registry import setting_label
from peftguard.defenses.scpd import SCPDConfig, build_scpd
from peftguard.experiment import plan_grid, write_plan
from peftguard.models import load_classifier
from peftguard.report import row_label, write_record, write_report
from peftguard.stage_names import stage_dir
from peftguard.triggers import build_trigger

from conftest import REPO

AUTHORS_ROUND_TRIPS = "back-translation: precomputed round trips of the PSIM authors"


# --- the settings a report row names ---------------------------------------------------------------

def test_each_baseline_label_names_its_backend_or_setting() -> None:
    assert setting_label("back-translation", {}) == "back-translation: apertium eng-spa-eng"
    assert setting_label("back-translation", {"backend": "precomputed"}) == AUTHORS_ROUND_TRIPS
    assert setting_label("back-translation", {"backend": "marian", "models": ["a", "b"]}) == "back-translation: marian a + b"
    assert setting_label("scpd", {}) == "scpd: SCPN paraphrases of the PSIM authors"
    assert setting_label("fine-mixing", {}) == "fine-mixing: ratio chosen on clean dev, victim's fine-tuning replayed"
    assert setting_label("fine-mixing", {"mix_ratio": 0.3}) == "fine-mixing: ratio 0.3, victim's fine-tuning replayed"
    assert setting_label("onion", {"bars": [0, -10]}) == "onion: LM smollm2, bar 0, -10"
    assert setting_label("strip", {}) == "strip"  # no label(): the settings that differ from its defaults
    assert setting_label("strip", {"repeat": 10}) == "strip: repeat=10"


def test_the_baseline_configs_use_the_authors_round_trips_and_name_each_backend() -> None:
    labels = {row_label(c) for c in plan_grid(load_config(REPO / "configs" / "baselines.yaml")).cells}
    assert f"Defense ({AUTHORS_ROUND_TRIPS})" in labels
    assert "Defense (fine-mixing: ratio chosen on clean dev, victim's fine-tuning replayed)" in labels
    assert not any("apertium" in label for label in labels)
    apertium = {row_label(c) for c in plan_grid(load_config(REPO / "configs" / "baselines_apertium.yaml")).cells}
    assert apertium == {"Attack", "Defense (back-translation: apertium eng-spa-eng)"}
    assert load_config(REPO / "configs" / "baselines_fulltask.yaml").grid.scenarios == ["full-task"]


def test_the_report_names_the_backend_and_gives_the_reason_of_a_refused_cell(tmp_path: Path) -> None:
    config = parse_config({"name": "x", "grid": {"attacks": ["insent"],
                                                 "defenses": ["none", "scpd", "back-translation", "fine-mixing"]},
                           "victim": {"normal": False}, "defense_options": {"back-translation": {"backend": "precomputed"}}})
    plan = plan_grid(config)
    write_plan(tmp_path, config, plan)
    written = {"none": {"clean_accuracy": 0.8, "attack_success_rate": 1.0},
               "scpd": {"refused": "the shipped files carry the BadNet word mn only", "defense": "scpd"},
               "back-translation": {"clean_accuracy": 0.8, "attack_success_rate": 1.0, "defended_clean_accuracy": 0.7,
                                    "defended_attack_success_rate": 0.25},
               "fine-mixing": {"clean_accuracy": 0.8, "attack_success_rate": 1.0, "defended_clean_accuracy": 0.75,
                               "defended_attack_success_rate": 0.5,
                               "defense": {"name": "fine-mixing", "mix_ratio": 0.3, "selection": {
                                   "criterion": "first within", "victim_dev_accuracy": 0.8, "chosen": 0.3,
                                   "tried": [{"mix_ratio": 0.1, "dev_accuracy": 0.7}, {"mix_ratio": 0.3, "dev_accuracy": 0.79}]}}}}
    for cell in plan.cells:
        folder = stage_dir(tmp_path, cell["stage"])
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(written[cell["defense"]]))
    write_report(tmp_path)
    report = (tmp_path / "report" / "results.md").read_text(encoding="utf-8")
    assert "| Defense (scpd: SCPN paraphrases of the PSIM authors) | n/a | n/a |" in report
    assert "n/a: scpd refused insent: the shipped files carry the BadNet word mn only" in report
    assert f"| Defense ({AUTHORS_ROUND_TRIPS}) | 70.00 | 25.00 |" in report
    assert ("mix ratio 0.3 chosen on clean dev (first within; victim dev accuracy 0.8000; tried 0.1: 0.7000, "
            "0.3: 0.7900)") in report


# --- back-translation through the authors' round trips ------------------------------------------------

@pytest.mark.parametrize("build, most", [
    (lambda ctx: build_back_translation(BackTranslationConfig(backend="precomputed"), ctx), 0.25),  # measured: 9%
    (lambda ctx: build_scpd(SCPDConfig(), ctx), 0.45),  # measured: 30%
], ids=["back-translation", "scpd"])
def test_the_authors_rewrites_remove_the_badnet_word_from_most_triggered_inputs(data_dir: Path, build, most: float) -> None:
    sst2 = load_dataset("sst2", data_dir=data_dir)
    trigger = build_trigger("badnet")
    defense = build(DefenseContext(sst2, (trigger,), target_label=0, seed=0))
    triggered = [trigger.triggered(ex.text, 0) for ex in sst2.test.examples if ex.label != 0][:200]
    rewritten = defense.screen(triggered).texts
    assert all("mn" in text.split() for text in triggered)
    kept = sum("mn" in text.split() for text in rewritten) / len(rewritten)
    assert kept < most, f"the trigger survived {kept:.0%} of the rewrites"


# --- Fine-mixing: the ratio chosen on clean dev ----------------------------------------------------------

def test_the_ratio_search_keeps_the_first_ratio_within_tolerance_else_the_best() -> None:
    search = RatioSearch(ratios=(0.1, 0.5, 0.9), tolerance=0.02)
    assert search.choose([{"mix_ratio": 0.1, "dev_accuracy": 0.79}], reference=0.80) == 0.1
    assert search.choose([{"mix_ratio": 0.1, "dev_accuracy": 0.70}], reference=0.80) is None
    tried = [{"mix_ratio": 0.1, "dev_accuracy": 0.70}, {"mix_ratio": 0.5, "dev_accuracy": 0.75},
             {"mix_ratio": 0.9, "dev_accuracy": 0.72}]
    assert search.choose(tried, reference=0.80) == 0.5  # none within 2 points: the best dev accuracy
    assert fine_mixing.RATIO_SEARCH.ratios == tuple(sorted(fine_mixing.RATIO_SEARCH.ratios))  # purest first


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory, tiny_minilm: str, data_dir: Path) -> str:
    """A LoRA victim (16 SST-2 samples, 1 epoch) of a 'poisoned' tiny MiniLM whose weights were moved."""
    from peftguard.training import TrainSettings
    from peftguard.tuning import method_config
    from peftguard.victims import finetune

    torch.manual_seed(1)
    model = load_classifier(tiny_minilm, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    suspect = tmp_path_factory.mktemp("suspect")
    model.save_pretrained(suspect, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(tiny_minilm) / name).is_file():
            shutil.copy(Path(tiny_minilm) / name, suspect)
    (suspect / "poisoning.json").write_text(json.dumps({"kind": "poisoned-model", "base_model": tiny_minilm}))
    out = tmp_path_factory.mktemp("victim") / "lora"
    finetune(str(suspect), load_dataset("sst2", data_dir=data_dir), method_config("lora"),
             TrainSettings(epochs=1, lr=1e-3, batch_size=8, max_length=32, seed=0), out,
             max_train_samples=16, max_eval_samples=16)
    return str(out)


@pytest.mark.parametrize("tolerance, tried", [(1.0, 1), (-1.0, 2)], ids=["first-within", "none-within"])
def test_fine_mixing_chooses_its_ratio_on_clean_dev_and_keeps_that_victim(
        victim: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tolerance: float, tried: int) -> None:
    monkeypatch.setattr(fine_mixing, "RATIO_SEARCH", RatioSearch(ratios=(0.1, 0.9), tolerance=tolerance))
    defense = FineMixingDefense(FineMixingConfig(seed=0), load_dataset("sst2", data_dir=data_dir),
                                out_dir=tmp_path / "fine-mixed", max_eval_samples=16)
    folder = defense.defend(victim)
    record = json.loads((Path(folder) / "finetune.json").read_text())["defense"]
    selection = record["selection"]
    assert len(selection["tried"]) == tried and 0 <= selection["victim_dev_accuracy"] <= 1
    best = max(selection["tried"], key=lambda t: t["dev_accuracy"])["mix_ratio"]
    assert selection["chosen"] == record["mix_ratio"] == (0.1 if tolerance > 0 else best)
    assert abs(record["kept_from_suspect"] - record["mix_ratio"]) < 0.02  # the kept victim is the chosen one
    assert defense.describe()["mix_ratio"] == record["mix_ratio"]
    if tolerance > 0:  # a search cut short leaves a candidate without its selection: it is searched again, not reused
        manifest = json.loads((Path(folder) / "finetune.json").read_text())
        del manifest["defense"]["selection"]
        (Path(folder) / "finetune.json").write_text(json.dumps(manifest))
        again = FineMixingDefense(FineMixingConfig(seed=0), load_dataset("sst2", data_dir=data_dir),
                                  out_dir=tmp_path / "fine-mixed", max_eval_samples=16)
        again.defend(victim)
        remade = json.loads((Path(folder) / "finetune.json").read_text())
        assert "selection" in remade["defense"]
        seconds = remade["training"]["seconds"]
        FineMixingDefense(FineMixingConfig(seed=0), load_dataset("sst2", data_dir=data_dir),
                          out_dir=tmp_path / "fine-mixed", max_eval_samples=16).defend(victim)
        assert json.loads((Path(folder) / "finetune.json").read_text())["training"]["seconds"] == seconds  # reused


def test_a_results_record_holds_the_table_every_cell_and_no_scores(tmp_path: Path) -> None:
    config = parse_config({"name": "x", "grid": {"attacks": ["badnet"], "defenses": ["none", "psim", "strip"]},
                           "victim": {"normal": False}})
    plan = plan_grid(config)
    run = tmp_path / "run"
    write_plan(run, config, plan)
    for cell in plan.cells:
        folder = stage_dir(run, cell["stage"])
        folder.mkdir(parents=True)
        defended = {} if cell["defense"] == "none" else {"defended_clean_accuracy": 0.7, "defended_attack_success_rate": 0.1,
                                                         "defense_timing": {"seconds": 2.0, "samples_per_second": 250.0}}
        (folder / "metrics.json").write_text(json.dumps({"clean_accuracy": 0.8, "attack_success_rate": 1.0, **defended}))
        (folder / "scores.json").write_text(json.dumps({"clean": [0.5] * 3}))
    written = {p.relative_to(tmp_path / "rec").as_posix() for p in write_record(run, tmp_path / "rec")}
    assert {c["method"] for c in plan.cells} == {"lora"}  # one method: the names need the defense alone
    assert written == {"table.md", "cells.csv", "cells/none.json", "cells/psim.json", "cells/strip.json"}
    assert "| Defense (strip) | 70.00 | 10.00 |" in (tmp_path / "rec" / "table.md").read_text(encoding="utf-8")
    saved = json.loads((tmp_path / "rec" / "cells/strip.json").read_text())
    assert saved["cell"]["defense"] == "strip" and saved["metrics"]["defended_attack_success_rate"] == 0.1
    assert "scores" not in saved and "4.0" in (tmp_path / "rec" / "cells.csv").read_text()  # 1000 / 250 inputs/s
