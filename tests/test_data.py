import json
from pathlib import Path

import pytest

from peftguard.data import Columns, load_dataset, read_split_file, subsample
from peftguard.errors import DataError, PeftguardError

from conftest import write_csv


def make_dataset(folder: Path, train_rows, dev_rows=(("fine", 0), ("good", 1)), test_rows=(("bad", 0), ("ok", 1))) -> Path:
    write_csv(folder / "train.csv", list(train_rows))
    write_csv(folder / "dev.csv", list(dev_rows))
    write_csv(folder / "test.csv", list(test_rows))
    return folder


def test_real_sst2_loads_with_paper_sizes(data_dir):
    data = load_dataset("sst2", data_dir=data_dir)
    assert (len(data.train), len(data.dev), len(data.test)) == (6920, 872, 1821)
    assert data.num_labels == 2


def test_real_cr_skips_its_four_empty_texts_with_a_count(data_dir, caplog):
    data = load_dataset("cr", data_dir=data_dir)
    assert data.train.skipped_empty == 4 and len(data.train) == 2496
    assert any("skipped 4 empty" in note for note in data.notes)


def test_missing_file_names_the_split(tmp_path):
    write_csv(tmp_path / "train.csv", [("a", 0), ("b", 1)])
    write_csv(tmp_path / "test.csv", [("a", 0)])
    with pytest.raises(DataError, match="no dev split"):
        load_dataset(str(tmp_path))


def test_missing_column_names_file_line_and_column(tmp_path):
    write_csv(tmp_path / "train.csv", [("a", 0)], header=("sentence", "label"))
    with pytest.raises(DataError) as err:
        read_split_file(tmp_path / "train.csv")
    assert "train.csv, line 1, column 'text'" in str(err.value) and "missing column" in str(err.value)


def test_configurable_columns(tmp_path):
    write_csv(tmp_path / "train.tsv.csv", [("a", 1)], header=("sentence", "y"))
    split = read_split_file(tmp_path / "train.tsv.csv", Columns("sentence", "y"))
    assert split.examples[0].text == "a" and split.examples[0].label == 1


def test_non_integer_label_names_line_and_column(tmp_path):
    path = write_csv(tmp_path / "train.csv", [("fine", 0), ("bad one", "positive")])
    with pytest.raises(DataError) as err:
        read_split_file(path)
    assert "line 3, column 'label'" in str(err.value) and "'positive' is not an integer" in str(err.value)


def test_label_out_of_range_in_test_split(tmp_path):
    make_dataset(tmp_path, [("a", 0), ("b", 1)], test_rows=[("c", 0), ("d", 2)])
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path))
    assert "test.csv, line 3" in str(err.value) and "out of range 0..1" in str(err.value)


def test_negative_label(tmp_path):
    path = write_csv(tmp_path / "train.csv", [("a", -1)])
    with pytest.raises(DataError, match="negative"):
        read_split_file(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nfine,0\ncaf\xe9 noir,1\n")
    with pytest.raises(DataError) as err:
        read_split_file(path)
    assert "line 3" in str(err.value) and "UTF-8" in str(err.value)


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\n\"said \"\"hi\"\", left\",1\r\nok,0\r\n")
    split = read_split_file(path)
    assert [ex.text for ex in split.examples] == ['said "hi", left', "ok"]


def test_nul_byte_is_reported(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"text,label\nfi\x00ne,0\n")
    with pytest.raises(DataError, match="line 2.*NUL"):
        read_split_file(path)


def test_tsv_and_jsonl(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\nhello, world\t1\nbye\t0\n", encoding="utf-8")
    assert read_split_file(tmp_path / "train.tsv").examples[0].text == "hello, world"
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "x", "label": 1}) + "\n{bad json\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 2.*invalid JSON"):
        read_split_file(tmp_path / "train.jsonl")


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "train.csv").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty file"):
        read_split_file(tmp_path / "train.csv")
    (tmp_path / "train.csv").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="no examples"):
        read_split_file(tmp_path / "train.csv")


def test_unknown_short_name_without_data_dir_or_folder(tmp_path, monkeypatch):
    with pytest.raises(PeftguardError, match="does not exist"):
        load_dataset("sst2", data_dir=tmp_path)


def test_subsample_is_reproducible_and_ordered(data_dir):
    examples = load_dataset("sst2", data_dir=data_dir).train.examples
    a, b = subsample(examples, 50, 3), subsample(examples, 50, 3)
    assert a == b and len(a) == 50 and a != subsample(examples, 50, 4)
    positions = [examples.index(x) for x in a[:10]]
    assert positions == sorted(positions)
