"""Determinism and interruption on a tiny demo (2-layer MiniLM, 120 SST-2 samples, LoRA only).

The demo is a grid run (src/peftguard/demo.yaml), so these are the grid runner's guarantees:
* The same command with the same seed gives byte-identical metrics, manifests and weights, timings
  and the output folder's own path aside, in another process with another hash seed.
* A run killed with SIGKILL in the middle of a training stage resumes: finished stages are reused
  untouched, the interrupted one restarts cleanly, and the results equal an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from peftguard.cli import app

pytestmark = pytest.mark.slow
TIMING_KEYS = {"timing", "defense_timing", "seconds", "wall_seconds", "samples_per_second"}
VICTIM_TRAINING_STARTED = re.compile(r"finetune lora epoch \d+/\d+:[^\r\n]*loss=")
STAGE_TIMEOUT_S = 300


def demo_args(out: Path, tiny_minilm: str, data_dir: Path) -> list[str]:
    return ["demo", "--out", str(out), "--model", tiny_minilm, "--data-dir", str(data_dir), "--method", "lora",
            "--max-train-samples", "120", "--max-eval-samples", "40", "--epochs", "1", "--poison-epochs", "3",
            "--max-length", "32", "--seed", "3"]


def run_in_process(args: list[str]) -> str:
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def subprocess_env() -> dict[str, str]:
    import torch

    # another hash seed (set ordering) but the same thread count as this process (float reductions)
    # (PEFTGUARD_THREADS too: the CLI's main() applies it, and the in-process runs here never call main())
    threads = str(torch.get_num_threads())
    return {**os.environ, "PYTHONHASHSEED": str(random.randrange(1, 2**16)), "OMP_NUM_THREADS": threads,
            "PEFTGUARD_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "peftguard.cli", *args], stdout=handle, stderr=subprocess.STDOUT,
                                env=subprocess_env())


def without_timings(value: Any, out: Path) -> Any:
    """A JSON value with timing fields dropped and the output folder's path replaced by '<out>'."""
    if isinstance(value, dict):
        return {k: without_timings(v, out) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v, out) for v in value]
    if isinstance(value, str):
        return value.replace(str(out.resolve()), "<out>").replace(str(out), "<out>")
    return value


def comparable_files(out: Path) -> dict[str, str]:
    """Every JSON artifact (normalized) and every weight file (raw bytes, hex digest) of a run."""
    import hashlib

    files = {}
    for path in sorted(out.rglob("*")):
        name = str(path.relative_to(out))
        if path.suffix == ".json":
            files[name] = json.dumps(without_timings(json.loads(path.read_text()), out), indent=1, sort_keys=True)
        elif path.suffix == ".safetensors":
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def leftovers(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in out.rglob("*") if re.search(r"\.(tmp|old)-", p.name)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_minilm: str, data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("resume") / "uninterrupted"
    run_in_process(demo_args(out, tiny_minilm, data_dir))
    return out


def stages_of(out: Path, kind: str) -> list[Path]:
    return sorted((out / "stages").glob(f"{kind}-*"))


def finished(stage: Path) -> bool:
    return (stage / "stage.json").is_file()


def test_same_command_and_seed_give_identical_metrics(uninterrupted: Path, tiny_minilm: str, data_dir: Path) -> None:
    again = uninterrupted.parent / "again"
    log = uninterrupted.parent / "again.log"
    process = start_cli(demo_args(again, tiny_minilm, data_dir), log)
    assert process.wait(timeout=STAGE_TIMEOUT_S * 2) == 0, log.read_text()[-3000:]
    first, second = comparable_files(uninterrupted), comparable_files(again)
    # Poisoned, Normal, Attack, Defense at the calibrated and at the paper's gamma
    assert sum(name.endswith("metrics.json") for name in first) == 5 and first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name
    normal = next(v for v in stages_of(again, "victim") if json.loads((v / "stage.json").read_text())["deps"] == [])
    manifest = json.loads((normal / "artifact" / "finetune.json").read_text())
    assert manifest["training"]["truncated_texts"] > 0  # --max-length 32 cuts some SST-2 sentences, counted


def wait_for_victim_training(process: subprocess.Popen, out: Path, log: Path) -> Path:
    """Until the poisoning stage is finished and a victim's fine-tuning has taken a step; that victim's stage."""
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the demo ended before it could be interrupted:\n{log.read_text()[-3000:]}")
        poisoned = [s for s in stages_of(out, "poison") if finished(s)]
        running = [s for s in stages_of(out, "victim") if not finished(s)]
        if poisoned and running and VICTIM_TRAINING_STARTED.search(log.read_text(errors="replace")):
            return running[0]
        time.sleep(0.05)
    process.kill()
    pytest.fail("no victim's training started in time")


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_killed_run_resumes_with_the_same_results(uninterrupted: Path, tiny_minilm: str, data_dir: Path) -> None:
    out = uninterrupted.parent / "interrupted"
    log = uninterrupted.parent / "interrupted.log"
    process = start_cli(demo_args(out, tiny_minilm, data_dir), log)
    interrupted = wait_for_victim_training(process, out, log)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert not finished(interrupted)  # killed in the middle of training
    poisoned = stages_of(out, "poison")[0]
    before = mtimes(poisoned)
    # what a kill during the save itself would leave: the writer's temporary folder, half full
    half_written = interrupted / f".artifact.tmp-{process.pid}-killed"
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"\0" * 64)

    output = run_in_process(demo_args(out, tiny_minilm, data_dir))

    assert f"reused {poisoned.name}" in output and f"ran {interrupted.name}" in output
    assert mtimes(poisoned) == before  # reused, not rewritten
    assert leftovers(out) == []
    expected, resumed = comparable_files(uninterrupted), comparable_files(out)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert expected[name] == resumed[name], name


def test_demo_adds_a_defense_row_per_baseline_without_redoing_its_stages(tmp_path, tiny_minilm, data_dir):
    from peftguard.report import load_cells, row_label

    out = tmp_path / "demo"
    run_in_process(demo_args(out, tiny_minilm, data_dir))
    before = {stage.name: mtimes(stage) for stage in (out / "stages").iterdir()}
    output = run_in_process(demo_args(out, tiny_minilm, data_dir) + ["--defense", "scpd", "--defense", "fine-mixing"])
    assert {stage: mtimes(out / "stages" / stage) for stage in before} == before  # nothing redone
    _, cells = load_cells(out)
    for name in ("scpd", "fine-mixing"):
        cell = next(c for c in cells if c.get("defense") == name)
        measured = cell["metrics"]
        assert 0 <= measured["defended_clean_accuracy"] <= 1 and 0 <= measured["defended_attack_success_rate"] <= 1
        ca, asr = (f"{100 * measured[k]:.2f}" for k in ("defended_clean_accuracy", "defended_attack_success_rate"))
        assert row_label(cell).startswith(f"Defense ({name}")  # the row names its defense (and its settings)
        assert f"| {row_label(cell)} | {ca} | {asr} |" in output


def test_demo_refuses_an_unknown_baseline_before_writing(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--defense", "magic"])
    from peftguard.defenses.registry import DEFENSES

    baselines = ", ".join(name for name in DEFENSES if name != "psim")
    assert f"--defense magic: choose from {baselines}, or all" in str(result.exception)
    assert not (tmp_path / "demo").exists()


def test_demo_with_two_workers_runs_the_same_stages_and_reports_every_cell(uninterrupted: Path, tiny_minilm: str,
                                                                           data_dir: Path) -> None:
    """`demo --workers 2` runs the grid in worker processes: the same stages (keys are settings), every cell reported."""
    from peftguard.report import load_cells

    out = uninterrupted.parent / "two-workers"
    log = uninterrupted.parent / "two-workers.log"
    process = start_cli(demo_args(out, tiny_minilm, data_dir) + ["--workers", "2"], log)
    assert process.wait(timeout=STAGE_TIMEOUT_S * 2) == 0, log.read_text()[-3000:]
    assert sorted(p.name for p in (out / "stages").iterdir()) == sorted(p.name for p in (uninterrupted / "stages").iterdir())
    _, cells = load_cells(out)
    _, expected = load_cells(uninterrupted)
    assert len(cells) == len(expected) and all("clean_accuracy" in c["metrics"] for c in cells)
    assert leftovers(out) == []
