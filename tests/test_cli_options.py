"""Out-of-range options are refused before any training starts, with the option named."""
import pytest
from typer.testing import CliRunner

from peftguard.cli import app
from peftguard.errors import OptionError, PeftguardError

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "args, message",
    [
        (("finetune", "--model", "{tiny}", "--out", "{tmp}/x", "--batch-size", "0", "--max-train-samples", "10"), "--batch-size"),
        (("finetune", "--model", "{tiny}", "--out", "{tmp}/x", "--method", "ptuning-v1", "--max-length", "6"), "--max-length"),
        (("finetune", "--model", "{tiny}", "--out", "{tmp}/x", "--max-length", "600"), "512 positions"),
        (("finetune", "--model", "{tiny}", "--out", "{tmp}/x", "--method", "adapterx"), "unknown method"),
        (("poison", "--model", "{tiny}", "--out", "{tmp}/x", "--max-train-samples", "100"), "exceeds the"),
        (("poison", "--model", "{tiny}", "--out", "{tmp}/x", "--target-label", "3"), "--target-label 3"),
        (("poison", "--model", "{tiny}", "--out", "{tmp}/x", "--scenario", "full-task"), "--proxy-dataset"),
        (("poison", "--model", "{tiny}", "--out", "{tmp}/x", "--scenario", "full-task", "--proxy-dataset", "agnews"), "label space"),
        (("psim", "train", "--model", "{tiny}", "--out", "{tmp}/x", "--gamma", "1.5", "--max-train-samples", "10"), "--gamma"),
        (("psim", "train", "--model", "{tiny}", "--out", "{tmp}/x", "--reset-rate", "2"), "--reset-rate"),
        (("evaluate", "--model", "{tiny}", "--defense", "psim"), "--psim"),
        (("evaluate", "--model", "{tiny}", "--defense", "magic"), "unknown defense"),
        (("evaluate", "--model", "{tmp}/missing"), "does not exist"),
    ],
)
def test_bad_options_fail_early_with_a_clear_error(args, message, tiny_minilm, data_dir, tmp_path):
    filled = [a.format(tiny=tiny_minilm, tmp=tmp_path) for a in args] + ["--data-dir", str(data_dir)]
    result = run(*filled)
    assert isinstance(result.exception, PeftguardError), result.output
    assert message in str(result.exception)
    assert not (tmp_path / "x").exists()  # nothing written


def test_poison_count_default_is_the_authors_1500(tiny_minilm, data_dir, tmp_path):
    result = run("poison", "--model", tiny_minilm, "--out", tmp_path / "x", "--max-train-samples", "2000",
                 "--data-dir", data_dir)
    assert isinstance(result.exception, OptionError)
    assert "poison count 1500 exceeds" in str(result.exception)
