"""Hub datasets as name[:config][@revision], and the remap of a test split published without labels.

No test touches the network: the hub loader is replaced by in-memory `datasets` objects.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from peftguard.data import (Columns, Example, HubSpec, Split, is_unlabeled, load_dataset, parse_hub_spec,
                            remap_unlabeled_test, resolve_dataset_path)
from peftguard.errors import PeftguardError

from conftest import write_csv


@pytest.mark.parametrize("text, spec", [
    ("imdb-reviews", HubSpec("imdb-reviews")),
    ("nyu-mll/glue:sst2", HubSpec("nyu-mll/glue", "sst2")),
    ("nyu-mll/glue@main", HubSpec("nyu-mll/glue", None, "main")),
    ("nyu-mll/glue:sst2@bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c",
     HubSpec("nyu-mll/glue", "sst2", "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c")),
    ("org/data:cfg@refs/pr/1", HubSpec("org/data", "cfg", "refs/pr/1")),
])
def test_hub_specs_parse_into_name_config_revision_and_back(text, spec):
    assert parse_hub_spec(text) == spec
    assert str(spec) == text


@pytest.mark.parametrize("text", ["glue:", "glue@", ":sst2", "@main", "glue:a:b", "glue@a@b", "glue@main:sst2"])
def test_a_malformed_hub_spec_is_one_line_showing_the_form(text):
    with pytest.raises(PeftguardError, match=r"name\[:config\]\[@revision\]"):
        parse_hub_spec(text)


def test_short_names_still_resolve_to_local_folders_and_refuse_a_revision(tmp_path):
    (tmp_path / "sst2").mkdir()
    assert resolve_dataset_path("sst2", tmp_path) == tmp_path / "sst2"
    with pytest.raises(PeftguardError, match="'sst2' is the short name of a local folder"):
        resolve_dataset_path("sst2@v1", tmp_path)
    with pytest.raises(PeftguardError, match="names a file format"):
        resolve_dataset_path("csv:default", tmp_path)


@pytest.mark.parametrize("labels, unlabeled", [
    ([-1, -1, -1], True), ([None, None], True), ([-1, 0], False), ([0, 1], False), ([], False), ([True], False),
])
def test_a_split_is_unlabeled_only_when_no_row_has_a_label(labels, unlabeled):
    assert is_unlabeled(labels) is unlabeled


def split_of(name: str, count: int, offset: int = 0) -> Split:
    examples = [Example(f"text {offset + i}", i % 2) for i in range(count)]
    return Split(name, examples, f"hub:x/{name}", 0, list(range(1, count + 1)))


def test_remap_makes_validation_the_test_split_and_carves_dev_from_train_reproducibly():
    train, validation = split_of("train", 50), split_of("validation", 8, offset=1000)
    kept, dev, test, note = remap_unlabeled_test(train, validation)
    assert test.name == "test" and test.examples == validation.examples
    assert dev.name == "dev" and len(dev) == 5  # a tenth of train: fewer than validation's 8
    assert len(kept) == 45 and not set(kept.examples) & set(dev.examples)
    assert sorted(kept.lines + dev.lines) == train.lines  # every train row once, with its source line
    assert [e.text for e in dev.examples] == sorted((e.text for e in dev.examples), key=lambda t: int(t.split()[1]))
    again = remap_unlabeled_test(train, validation)
    assert again[1].examples == dev.examples  # the same carve every run
    assert remap_unlabeled_test(train, validation, seed=1)[1].examples != dev.examples
    assert "no labels" in note and "5 examples carved from train (seed 0)" in note


def test_remap_carves_as_many_dev_examples_as_validation_has_when_train_is_large():
    _, dev, _, _ = remap_unlabeled_test(split_of("train", 200), split_of("validation", 8))
    assert len(dev) == 8


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace `datasets.load_dataset` with in-memory splits; records how it was called."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def install(splits: dict[str, dict[str, list]]):
        def load(path, name=None, *, revision=None):
            calls.append((path, name, revision))
            return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows) for split, rows in splits.items()})

        monkeypatch.setattr(datasets, "load_dataset", load)
        return calls

    return install


def glue_like(test_labels: list[int]) -> dict[str, dict[str, list]]:
    return {
        "train": {"sentence": [f"train {i}" for i in range(40)], "label": [i % 2 for i in range(40)]},
        "validation": {"sentence": [f"validation {i}" for i in range(6)], "label": [i % 2 for i in range(6)]},
        "test": {"sentence": [f"test {i}" for i in range(len(test_labels))], "label": test_labels},
    }


def test_a_glue_style_hub_dataset_loads_with_config_and_revision_and_remaps_its_unlabeled_test(fake_hub):
    calls = fake_hub(glue_like([-1] * 7))
    data = load_dataset("nyu-mll/glue:sst2@abc123", columns=Columns(text="sentence"))
    assert calls == [("nyu-mll/glue", "sst2", "abc123")]
    assert data.name == "nyu-mll/glue:sst2@abc123"
    assert [e.text for e in data.test.examples] == [f"validation {i}" for i in range(6)]
    assert (len(data.train), len(data.dev)) == (36, 4)
    assert all(e.text.startswith("train ") for e in data.train.examples + data.dev.examples)
    assert "published test split has no labels" in data.notes[0] and "hub:nyu-mll/glue:sst2@abc123/validation" in data.notes[0]


def test_a_labelled_hub_test_split_is_kept_as_it_is(fake_hub):
    calls = fake_hub(glue_like([0, 1, 1]))
    data = load_dataset("someone/reviews", columns=Columns(text="sentence"))
    assert calls == [("someone/reviews", None, None)]
    assert [e.text for e in data.test.examples] == ["test 0", "test 1", "test 2"]
    assert (len(data.train), len(data.dev)) == (40, 6) and not data.notes


def test_a_hub_dataset_without_the_text_column_names_it(fake_hub):
    fake_hub(glue_like([-1]))
    with pytest.raises(PeftguardError, match=r"hub:nyu-mll/glue:sst2/train, column 'text': missing column; has \['sentence', 'label'\]"):
        load_dataset("nyu-mll/glue:sst2")


def test_local_folders_are_never_sent_to_the_hub(fake_hub, tmp_path: Path):
    calls = fake_hub(glue_like([-1]))
    for split in ("train", "dev", "test"):
        write_csv(tmp_path / f"{split}.csv", [("good", 1), ("bad", 0)])
    assert len(load_dataset(str(tmp_path)).test) == 2
    assert calls == []
