"""Untrusted checkpoints: pickles are refused by default and never unpickled."""
import pickle
from pathlib import Path

import pytest

from peftguard.errors import UnsafeCheckpointError
from peftguard.models import LoadOptions, load_classifier


class _PlantsAFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle_checkpoint(folder: Path, marker: Path, tiny_minilm: str) -> None:
    import shutil

    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(tiny_minilm) / name, folder / name)
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weights": _PlantsAFile(marker)}, handle)


def test_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path, tiny_minilm):
    marker = tmp_path / "pwned"
    plant_pickle_checkpoint(tmp_path / "model", marker, tiny_minilm)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_classifier(str(tmp_path / "model"), 2)
    message = str(err.value)
    assert "pickle" in message.lower() and "safetensors" in message and "--allow-pickle" in message
    assert not marker.exists()


def test_allow_pickle_still_uses_weights_only(tmp_path, tiny_minilm):
    marker = tmp_path / "pwned"
    plant_pickle_checkpoint(tmp_path / "model", marker, tiny_minilm)
    with pytest.raises(Exception):
        load_classifier(str(tmp_path / "model"), 2, LoadOptions(allow_pickle=True))
    assert not marker.exists()  # weights_only=True refuses to build arbitrary objects


def test_cli_refusal_is_one_line_without_traceback(tmp_path, tiny_minilm, data_dir):
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    plant_pickle_checkpoint(tmp_path / "model", marker, tiny_minilm)
    run = subprocess.run(
        [sys.executable, "-m", "peftguard.cli", "evaluate", "--model", str(tmp_path / "model"),
         "--data-dir", str(data_dir), "--max-eval-samples", "10"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "refusing pickled checkpoint" in run.stderr
    assert not marker.exists()
