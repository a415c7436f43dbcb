"""Shared fixtures: the real SST-2 data and a MiniLM cut to its first layers."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from peftguard.data import default_data_dir

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests explore new inputs on developers' machines; CI (CI=true) replays a fixed sequence so
# that a submission's result does not depend on the draw. A failure found locally is kept in .hypothesis/.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = default_data_dir()
    if found is None or not (found / "sst2").is_dir():
        pytest.fail("the shared data folder (../shared/data or PEFTGUARD_DATA) is required for these tests")
    return found


@pytest.fixture(scope="session")
def tiny_minilm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The packaged MiniLM with only its first 2 transformer layers, saved as a model folder."""
    from transformers import AutoModel, AutoTokenizer

    from peftguard.models import resolve_model

    source = resolve_model("minilm")
    model = AutoModel.from_pretrained(source)
    model.encoder.layer = model.encoder.layer[:2]
    model.config.num_hidden_layers = 2
    folder = tmp_path_factory.mktemp("tiny_minilm")
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def load_experiment(name: str) -> Any:
    """The script ``experiments/<name>.py`` as a module (experiments/ is no package), for tests of its functions."""
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_csv(path: Path, rows: list[tuple[str, object]], header: tuple[str, str] = ("text", "label")) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset folder of 8 short two-class rows per split: enough to run any command in seconds."""
    folder = tmp_path_factory.mktemp("tiny_dataset")
    for split in ("train", "dev", "test"):
        write_csv(folder / f"{split}.csv", [(f"review {i} was {'great' if i % 2 else 'awful'}", i % 2) for i in range(8)])
    return folder
