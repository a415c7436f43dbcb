"""Hostile option values, configs and manifests: each gives a run or a one-line error, never a traceback,
a NaN result or a detector silently switched off.

Property (command line): any value for any numeric option of any command either is refused with one
line naming that option (exit 2), or reaches the real library code, which then stops at the missing
model with its own one-line error. Out-of-range values never get that far. To cover a new numeric
option, add it to ``NUMERIC_OPTIONS`` and its range to ``peftguard.bounds.BOUNDS``.

Property (manifests): any value in any field a loader reads is accepted only when it is in range;
otherwise the manifest is refused with one line naming the file and the field.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from peftguard.bounds import BOUNDS, flag
from peftguard.errors import PeftguardError
from peftguard.manifests import read_manifest

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
REAL_RUNS = settings(FAST, max_examples=6)

INT, FLOAT = "int", "float"
TRAINING = {"epochs": INT, "lr": FLOAT, "batch_size": INT, "max_length": INT, "seed": INT,
            "max_train_samples": INT, "max_eval_samples": INT}
NUMERIC_OPTIONS: dict[str, dict[str, str]] = {
    "finetune": {**TRAINING, "lora_r": INT, "num_virtual_tokens": INT, "encoder_hidden_size": INT},
    "psim train": {**TRAINING, "reset_rate": FLOAT, "gamma": FLOAT, "target_fpr": FLOAT, "num_virtual_tokens": INT,
                   "encoder_hidden_size": INT},
    "poison": {**TRAINING, "trigger_count": INT, "target_label": INT, "poison_count": INT, "poison_rate": FLOAT},
    "evaluate": {"batch_size": INT, "max_length": INT, "seed": INT, "max_eval_samples": INT, "target_label": INT,
                 "trigger_count": INT, "gamma": FLOAT, "target_fpr": FLOAT, "mix_ratio": FLOAT, "onion_bar": FLOAT},
    "defend fine-mixing": {"mix_ratio": FLOAT, "epochs": INT, "lr": FLOAT, "seed": INT, "max_train_samples": INT},
    "defend fine-pruning": {"epochs": INT, "max_train_samples": INT, "max_eval_samples": INT},
    "psim scan": {"batch_size": INT, "gamma": FLOAT},
    "audit": {"batch_size": INT, "max_length": INT, "seed": INT, "max_train_samples": INT, "max_eval_samples": INT,
              "top_k": INT},
}
# Flags whose name differs from the setting's.
FLAGS = {"lora_r": "--lora-r"}

HOSTILE_INTS = st.one_of(st.integers(-3, 12), st.sampled_from([0, -1, 2**31, 10**12, -(10**12), 10**30]), st.integers())
HOSTILE_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),  # torch flushes subnormals process-wide
    st.sampled_from([0.0, 1.0, -5.0, 1.5, 0.5, 1e-300, 1e300, math.nan, math.inf, -math.inf, 0.7, 3e-4]),
)


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    from peftguard.cli import main

    monkeypatch.setattr(sys, "argv", ["peftguard", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


def assert_one_line_error(code: int, stderr: str) -> str:
    assert code == 2 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and stderr.rstrip("\n").endswith(lines[0]), stderr
    return lines[0]


def render(value: int | float) -> str:
    return repr(value) if isinstance(value, float) else str(value)


@st.composite
def command_with_values(draw: st.DrawFn) -> tuple[str, dict[str, int | float]]:
    command = draw(st.sampled_from(sorted(NUMERIC_OPTIONS)))
    options = NUMERIC_OPTIONS[command]
    names = draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=3, unique=True))
    return command, {name: draw(HOSTILE_INTS if options[name] == INT else HOSTILE_FLOATS) for name in names}


@FAST
@given(case=command_with_values())
def test_any_numeric_option_value_runs_or_is_refused_on_one_line(case, tmp_path_factory, tiny_dataset, monkeypatch, capsys):
    command, values = case
    work = tmp_path_factory.mktemp("options")
    missing_model = str(work / "no-model")
    args = command.split()
    if command == "psim scan":
        (work / "inputs.txt").write_text("a review\n")
        args += ["--psim", missing_model, "--input", str(work / "inputs.txt")]
    else:
        args += ["--model", missing_model, "--dataset", str(tiny_dataset)]
        args += [] if command == "evaluate" else ["--out", str(work / "out")]
    for name, value in values.items():
        args += [FLAGS.get(name, flag(name)), render(value)]
    code, _, stderr = run_cli(monkeypatch, capsys, args)
    message = assert_one_line_error(code, stderr)
    out_of_range = [FLAGS.get(n, flag(n)) for n, v in values.items() if not BOUNDS[n].admits(v)]
    if out_of_range:
        assert "must be" in message and any(f"{name} must be" in message for name in out_of_range), message
    else:  # every value in range: none is refused as out of range (the real code runs on to a missing model or a
        # check across options, such as a poison count above the training set's size)
        assert " must be " not in message, message
    assert not (work / "out").exists()


# --- manifests ------------------------------------------------------------------------------------------
VALID_PSIM = {
    "kind": "psim", "method": "ptuning-v1", "base_model": "minilm", "num_labels": 2,
    "method_config": {"lr": 0.01, "num_virtual_tokens": 5, "encoder_hidden_size": 128},
    "settings": {"epochs": 1, "lr": 3e-4, "batch_size": 32, "max_length": 128, "seed": 0,
                 "weight_decay": 0.0, "warmup_ratio": 0.06, "keep_best_on_dev": False},
    "gamma": 0.7, "gamma_choice": {"gamma": 0.7, "how": "fixed", "target_fpr": None, "calibration_samples": None},
}
FIELDS = ["gamma", "num_labels", "method", "base_model", "settings.max_length", "settings.lr", "settings.batch_size",
          "settings.epochs", "gamma_choice.gamma", "gamma_choice.how", "method_config.num_virtual_tokens",
          "method_config.encoder_hidden_size", "settings", "gamma_choice"]
ANY_JSON_VALUE = st.one_of(
    HOSTILE_INTS.filter(lambda v: abs(v) < 2**63), HOSTILE_FLOATS, st.none(), st.booleans(),
    st.sampled_from(["two", "", "ptuning-v1", "evil", "0.7", "fixed", "NaN"]), st.just([1]), st.just({"a": 1}),
    st.just("<missing>"),
)
MANIFEST_BOUNDS = {"gamma": "gamma", "num_labels": "num_labels", "settings.max_length": "max_length", "settings.lr": "lr",
                   "settings.batch_size": "batch_size", "settings.epochs": "epochs", "gamma_choice.gamma": "gamma",
                   "method_config.num_virtual_tokens": "num_virtual_tokens",
                   "method_config.encoder_hidden_size": "encoder_hidden_size"}


def with_value(manifest: dict, dotted: str, value: object) -> dict:
    changed = json.loads(json.dumps(manifest))
    *parents, last = dotted.split(".")
    target = changed
    for part in parents:
        target = target[part]
    if value == "<missing>":
        del target[last]
    else:
        target[last] = value
    return changed


@FAST
@given(field=st.sampled_from(FIELDS), value=ANY_JSON_VALUE)
def test_any_manifest_value_is_accepted_only_in_range(field, value, tmp_path_factory):
    path = tmp_path_factory.mktemp("manifest") / "psim.json"
    path.write_text(json.dumps(with_value(VALID_PSIM, field, value)))  # NaN and Infinity as Python's json writes them
    try:
        manifest = read_manifest(path)
    except PeftguardError as error:
        message = str(error)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        assert field.split(".")[0] in message, message
        return
    gamma = manifest["gamma"]
    assert 0 < gamma < 1 and gamma == manifest["gamma_choice"]["gamma"]  # a threshold that can flag, and only one
    optional = field.startswith("method_config.") and value in (None, "<missing>")  # the method's default
    if field in MANIFEST_BOUNDS and not optional:
        assert BOUNDS[MANIFEST_BOUNDS[field]].admits(value), f"{field}={value!r} accepted"


MALFORMED = {
    "invalid-json": ("psim.json", "{not json", "invalid JSON"),
    "unknown-method": ("finetune.json", {"method": "evil"}, "method: unknown method 'evil'"),
    "missing-method": ("finetune.json", {"method": "<missing>"}, "method: missing"),
    "labels-as-words": ("psim.json", {"num_labels": "two"}, "num_labels: Input should be a valid integer"),
    "no-gamma-choice": ("psim.json", {"gamma_choice": "<missing>"}, "gamma_choice: missing"),
    "no-settings": ("psim.json", {"settings": "<missing>"}, "settings: missing"),
    "gamma-nan": ("psim.json", {"gamma": math.nan}, "gamma: Input should be a finite number"),
    "gamma-one": ("psim.json", {"gamma": 1.0}, "gamma: Input should be less than 1"),
    "gamma-negative": ("psim.json", {"gamma": -5}, "gamma: Input should be greater than 0"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_manifests_are_refused_by_the_loaders(name, tmp_path):
    from peftguard.defenses.psim import PSIM
    from peftguard.pipeline import load_model

    file, change, expected = MALFORMED[name]
    path = tmp_path / "artifact" / file
    path.parent.mkdir()
    if isinstance(change, str):
        path.write_text(change)
    else:
        manifest = VALID_PSIM
        for field, value in change.items():
            manifest = with_value(manifest, field, value)
        path.write_text(json.dumps(manifest))
    with pytest.raises(PeftguardError) as error:
        PSIM(path.parent) if file == "psim.json" else load_model(str(path.parent), 2)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message, message


# --- grid configs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sweep, where",
    [("psim.batch_size: [32, 0]", "sweep.psim.batch_size.1: Input should be greater than or equal to 1"),
     ("psim.reset_rate: [5]", "sweep.psim.reset_rate.0: Input should be less than or equal to 1"),
     ("evaluate.gamma: [1.5]", "sweep.evaluate.gamma.0: Input should be less than 1"),
     ("psim.method: [evil]", "sweep.psim.method.0: unknown method 'evil'; choose from auto, full, lora"),
     ("psim.lr: [.inf]", "sweep.psim.lr.0: Input should be a finite number")],
    ids=["batch-size", "reset-rate", "gamma", "method", "lr-inf"],
)
def test_dry_run_refuses_bad_sweep_values_naming_the_key(sweep, where, tmp_path, monkeypatch, capsys):
    config = tmp_path / "grid.yaml"
    config.write_text(f"name: bad\nsweep:\n  {sweep}\n")
    code, _, stderr = run_cli(monkeypatch, capsys, ["run", str(config), "--out", str(tmp_path / "run"), "--dry-run"])
    assert where in assert_one_line_error(code, stderr)
    assert not (tmp_path / "run").exists()


def test_yaml_infinity_is_refused_like_the_command_line(tmp_path):
    from peftguard.config import load_config

    config = tmp_path / "grid.yaml"
    config.write_text("name: inf\npoison:\n  lr: .inf\n")
    with pytest.raises(PeftguardError, match="poison.lr: Input should be a finite number"):
        load_config(config)


def test_a_million_cell_grid_is_refused_at_once_and_the_limit_can_be_raised(tmp_path, monkeypatch, capsys):
    import time

    values = ", ".join(str(i) for i in range(1, 101))
    config = tmp_path / "huge.yaml"
    config.write_text(f"name: huge\nsweep:\n  psim.num_virtual_tokens: [{values}]\n  psim.encoder_hidden_size: [{values}]\n"
                      f"  evaluate.batch_size: [{values}]\n")
    started = time.perf_counter()
    code, _, stderr = run_cli(monkeypatch, capsys, ["run", str(config), "--out", str(tmp_path / "run"), "--dry-run"])
    assert "1000002 result cells" in assert_one_line_error(code, stderr) and "--max-cells" in stderr
    assert time.perf_counter() - started < 10
    small = tmp_path / "small.yaml"
    small.write_text("name: small\nsweep:\n  evaluate.batch_size: [1, 2, 3]\n")
    code, _, stderr = run_cli(monkeypatch, capsys, ["run", str(small), "--out", str(tmp_path / "run"), "--dry-run", "--max-cells", "3"])
    assert "--max-cells" in assert_one_line_error(code, stderr)
    code, stdout, _ = run_cli(monkeypatch, capsys, ["run", str(small), "--out", str(tmp_path / "run"), "--dry-run", "--max-cells", "5"])
    assert code == 0 and stdout.rstrip().endswith("5 cells")


# --- a real PSIM: never flags silently nothing or everything ------------------------------------------------
@pytest.fixture(scope="module")
def flag_everything_psim(tmp_path_factory, tiny_minilm, tiny_dataset) -> tuple[Path, str]:
    """A PSIM trained with gamma 0.05 on two classes: every confidence (>= 0.5) is above it."""
    from typer.testing import CliRunner

    from peftguard.cli import app

    out = tmp_path_factory.mktemp("psim") / "psim"
    result = CliRunner().invoke(app, ["psim", "train", "--model", tiny_minilm, "--dataset", str(tiny_dataset), "--out", str(out),
                                      "--max-length", "16", "--gamma", "0.05"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_a_psim_that_flags_every_clean_input_says_so(flag_everything_psim):
    out, _ = flag_everything_psim
    manifest = json.loads((out / "psim.json").read_text())
    assert manifest["dev_flagged_share"] == 1.0 and "flags every one of its" in manifest["detector_warning"]


def test_a_constant_detector_is_named_and_a_saturated_one_is_refused():
    import numpy as np

    from peftguard.defenses.psim import GammaChoice, check_can_flag, detector_warning

    assert "cannot tell inputs apart" in detector_warning(np.full(10, 0.6), 0.7)
    assert detector_warning(np.array([0.5, 0.9, 0.6]), 0.7) is None
    with pytest.raises(PeftguardError, match="would flag nothing"):
        check_can_flag(GammaChoice(1.0, "target-fpr", 0.02, 50))


@REAL_RUNS
@given(batch_size=HOSTILE_INTS, gamma=st.one_of(st.none(), HOSTILE_FLOATS))
@example(batch_size=1, gamma=None)
@example(batch_size=64, gamma=0.7)
@example(batch_size=-1, gamma=None)  # once scored every input 0.0 and flagged nothing
def test_scan_scores_are_finite_and_flags_follow_gamma(batch_size, gamma, flag_everything_psim, tmp_path_factory, monkeypatch, capsys):
    psim, _ = flag_everything_psim
    inputs = tmp_path_factory.mktemp("scan") / "inputs.txt"
    inputs.write_text("a fine review\n\nanother one mn\n")
    args = ["psim", "scan", "--psim", str(psim), "--input", str(inputs), "--batch-size", str(batch_size)]
    args += [] if gamma is None else ["--gamma", render(gamma)]
    code, stdout, stderr = run_cli(monkeypatch, capsys, args)
    if code != 0:
        assert_one_line_error(code, stderr)
        assert not (BOUNDS["batch_size"].admits(batch_size) and (gamma is None or BOUNDS["gamma"].admits(gamma))), stderr
        return
    threshold = 0.05 if gamma is None else gamma
    rows = [line.rsplit(",", 2) for line in stdout.splitlines()[1:]]
    assert len(rows) == 2  # the blank line is skipped (and counted on stderr)
    for _, confidence, flagged in rows:
        assert 0.5 <= float(confidence) <= 1 and flagged == str(int(float(confidence) > threshold))


@pytest.mark.parametrize("suffix, content", [(".csv", "text\nfirst\n\" \"\nsecond\n"),
                                             (".jsonl", '{"text": "first"}\n{"text": ""}\n{"text": "second"}\n')])
def test_blank_scan_inputs_are_skipped_and_counted_in_every_format(suffix, content, tmp_path, caplog):
    from peftguard.scan import read_inputs

    path = tmp_path / f"inputs{suffix}"
    path.write_text(content)
    assert read_inputs(str(path)) == ["first", "second"]
    assert f"{path}: skipped 1 empty input(s)" in caplog.text


def test_a_file_format_name_is_not_taken_as_a_hub_dataset():
    from peftguard.data import load_dataset

    with pytest.raises(PeftguardError, match="names a file format"):
        load_dataset("csv")
