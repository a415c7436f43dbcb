"""--out never destroys a user's files or an input, file outputs refuse folders, and replacing an
artifact leaves the old or the new one at every instant (a kill between the two renames included)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peftguard.artifacts import atomic_dir, check_output_dir, remove_stale_temporaries

PYTHON_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                          os.environ.get("PYTHONPATH")]))}


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """Run the CLI in this process as a user would; (exit code, stderr)."""
    from peftguard.cli import main

    monkeypatch.setattr(sys, "argv", ["peftguard", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    stderr = capsys.readouterr().err
    return int(exit_.value.code or 0), stderr


def assert_one_line_refusal(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2 and "Traceback" not in stderr, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def user_folder(path: Path) -> Path:
    """A folder a user cares about: a file and a sub-folder."""
    (path / "chapters").mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work")
    (path / "chapters" / "one.txt").write_text("chapter one")
    return path


def assert_untouched(path: Path) -> None:
    assert (path / "thesis.txt").read_text() == "four years of work"
    assert (path / "chapters" / "one.txt").read_text() == "chapter one"


WRITERS = {
    "finetune": ["finetune", "--model", "{model}"],
    "psim train": ["psim", "train", "--model", "{model}"],
    "poison": ["poison", "--model", "{model}"],
    "defend fine-mixing": ["defend", "fine-mixing", "--model", "{model}"],
    "defend fine-pruning": ["defend", "fine-pruning", "--model", "{model}"],
    "demo": ["demo", "--model", "{model}"],
}


@pytest.mark.parametrize("command", list(WRITERS))
def test_out_holding_user_files_is_refused_before_any_work(command, tiny_minilm, data_dir, tmp_path, monkeypatch, capsys):
    out = user_folder(tmp_path / "mine")
    args = [a.format(model=tiny_minilm) for a in WRITERS[command]]
    code, stderr = run_cli(monkeypatch, capsys, *args, "--out", out, "--data-dir", data_dir)
    assert_one_line_refusal(code, stderr, f"--out {out} holds files", "thesis.txt", "--overwrite")
    assert_untouched(out)


def test_evaluate_fine_mixed_folder_of_user_files_is_refused(tiny_minilm, data_dir, tmp_path, monkeypatch, capsys):
    out = user_folder(tmp_path / "mine")
    code, stderr = run_cli(monkeypatch, capsys, "evaluate", "--model", tiny_minilm, "--defense", "fine-mixing",
                           "--fine-mixed", out, "--data-dir", data_dir)
    assert_one_line_refusal(code, stderr, "holds files")
    assert_untouched(out)


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_out_never_replaces_or_enters_the_input_model(where, tiny_minilm, tmp_path, monkeypatch, capsys):
    import shutil

    model = tmp_path / "models" / "mine"
    shutil.copytree(tiny_minilm, model)
    before = sorted(p.name for p in model.iterdir())
    out = {"same": model, "inside": model / "victim", "parent": model.parent}[where]
    code, stderr = run_cli(monkeypatch, capsys, "finetune", "--model", model, "--out", out, "--overwrite")
    assert_one_line_refusal(code, stderr, str(model))
    assert sorted(p.name for p in model.iterdir()) == before


def test_out_may_not_be_the_current_directory(tiny_minilm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, stderr = run_cli(monkeypatch, capsys, "psim", "train", "--model", tiny_minilm, "--out", ".", "--overwrite")
    assert_one_line_refusal(code, stderr, "current directory")
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


@pytest.mark.parametrize("command", [["evaluate", "--model", "{model}"], ["psim", "scan", "--psim", "{model}", "--input", "-"]],
                         ids=["evaluate", "psim-scan"])
def test_file_outputs_refuse_a_folder_up_front(command, tiny_minilm, tmp_path, monkeypatch, capsys):
    folder = user_folder(tmp_path / "results")
    args = [a.format(model=tiny_minilm) for a in command]
    code, stderr = run_cli(monkeypatch, capsys, *args, "--out", folder, "--overwrite")
    assert_one_line_refusal(code, stderr, "is a folder")
    assert_untouched(folder)


def test_scan_output_never_overwrites_a_user_file_or_its_input(tiny_minilm, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("a review\n")
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\nnotes,here\n")
    code, stderr = run_cli(monkeypatch, capsys, "psim", "scan", "--psim", tiny_minilm, "--input", inputs, "--out", notes)
    assert_one_line_refusal(code, stderr, "not a scan result made by peftguard")
    code, stderr = run_cli(monkeypatch, capsys, "psim", "scan", "--psim", tiny_minilm, "--input", inputs, "--out", inputs,
                           "--overwrite")
    assert_one_line_refusal(code, stderr, "would replace the input")
    assert notes.read_text() == "my,own\nnotes,here\n" and inputs.read_text() == "a review\n"


def test_run_out_keeps_a_users_config_and_accepts_its_own_run_folder(tmp_path, monkeypatch, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text("name: tiny\n")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    code, stderr = run_cli(monkeypatch, capsys, "run", config, "--out", out, "--dry-run")
    assert_one_line_refusal(code, stderr, "not a run folder")
    assert (out / "config.json").read_text() == '{"mine": true}'
    (out / "cells.json").write_text("{}")  # what `peftguard run` writes first: a run folder, resumed
    code, _ = run_cli(monkeypatch, capsys, "run", config, "--out", out, "--dry-run")
    assert code == 0


def test_overwrite_replaces_and_an_artifact_of_the_same_kind_is_replaced_without_it(tiny_minilm, tiny_dataset, tmp_path,
                                                                                      monkeypatch, capsys):
    data = tiny_dataset
    out = user_folder(tmp_path / "victim")
    common = ["finetune", "--model", tiny_minilm, "--dataset", data, "--out", out, "--max-length", 16, "--epochs", 1]
    code, stderr = run_cli(monkeypatch, capsys, *common, "--overwrite")
    assert code == 0, stderr
    assert (out / "finetune.json").is_file() and not (out / "thesis.txt").exists()
    code, stderr = run_cli(monkeypatch, capsys, *common, "--seed", 1)  # a victim made here: replaced without --overwrite
    assert code == 0, stderr
    assert json.loads((out / "finetune.json").read_text())["seed"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".victim")] == []


# --- replacing an artifact is atomic -----------------------------------------------------------------
def test_a_failed_write_keeps_the_old_artifact(tmp_path):
    target = tmp_path / "artifact"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed mid-training")
    assert (target / "weights").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from peftguard import artifacts

    target, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    artifacts._exchange = lambda a, b: False  # the two-rename fallback (filesystems without RENAME_EXCHANGE)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == kill_at:
            os._exit(9)  # SIGKILL-like: no cleanup runs
        real_replace(src, dst)

    artifacts.os.replace = replace
    with artifacts.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new")
""")


@pytest.mark.parametrize("kill_at", [1, 2, 3], ids=["before-moving-old-aside", "between-the-renames", "not-killed"])
def test_a_writer_killed_at_any_rename_leaves_the_old_or_the_new_artifact(kill_at, tmp_path):
    target = tmp_path / "artifact"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target), str(kill_at)], env=PYTHON_ENV, timeout=120)
    remove_stale_temporaries(target)  # what the next write, or the next --out check, does first
    assert (target / "weights").read_text() in ("old", "new")
    assert (target / "weights").read_text() == ("new" if kill_at == 3 else "old")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_output_check_restores_an_artifact_left_aside_by_a_killed_writer(tmp_path):
    target = tmp_path / "psim"
    aside = tmp_path / ".psim.old-999999999"  # no process has this id
    aside.mkdir()
    (aside / "psim.json").write_text("{}")
    check_output_dir(target, marker="psim.json", kind="PSIM")
    assert (target / "psim.json").is_file() and not aside.exists()

