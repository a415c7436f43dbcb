"""Hostile and malformed user files: every reader parses them or fails with a one-line error.

Property: each reader of a user file either returns what a well-formed file holds (the texts
round-trip) or raises :class:`PeftguardError` whose message is one line naming the file and,
where it applies, the line and column. Never another exception type, never a silent skip of a
non-empty text.

To cover a new reader (precomputed paraphrase files, YAML configs, ...), append a
:class:`UserFileReader` to ``USER_FILE_READERS``: the random-bytes and mutation properties then
run on it. Give it ``write``/``expect`` for the round trip, or ``seeds`` (well-formed files as
bytes) when its content is not a list of texts.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from peftguard.data import Columns, load_dataset, read_split_file
from peftguard.errors import DataError, PeftguardError
from peftguard.scan import read_inputs

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FOLDER_SETTINGS = settings(PROPERTY_SETTINGS, max_examples=50)  # three files per example
BOM = b"\xef\xbb\xbf"
INVALID_UTF8 = (b"\xff", b"\xfe", b"\xc0", b"\xed\xa0\x80")  # never valid anywhere in UTF-8
SPECIAL_PIECES = ['"', '""', ",", "\t", "\n", "\r", "\r\n", "\ufeff", "\x00", "\u2028", "\x85", "\x0b", " ", "'", "mn", "é"]


# --- the registry other readers join -----------------------------------------------------------
@dataclass(frozen=True)
class UserFileReader:
    """One reader of user files, as the properties below exercise it.

    ``read(path)`` returns the texts it found (raising PeftguardError on a bad file).
    ``write(texts, newline)`` renders a well-formed file holding ``texts``; ``expect(texts)`` is
    what ``read`` must return for it, or None when such a file must be refused.
    ``text_strategy`` draws texts this format can hold; ``seeds`` are extra well-formed files.
    """

    name: str
    suffix: str
    read: Callable[[Path], list[str]]
    write: Callable[[list[str], str], str] | None = None
    expect: Callable[[list[str]], list[str] | None] = lambda texts: texts
    text_strategy: st.SearchStrategy[str] | None = None
    seeds: tuple[bytes, ...] = ()


def hostile_text(*, exclude: str = "") -> st.SearchStrategy[str]:
    """Any characters mixed with quotes, separators, line breaks, BOMs and NULs; now and then 131k+ chars."""
    pieces = st.one_of(
        st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
        st.sampled_from(SPECIAL_PIECES),
    )
    short = st.lists(pieces, max_size=6).map("".join)
    long = st.integers(131_073, 140_000).map(lambda n: "x" * n)  # beyond csv's default field limit
    text = st.one_of(*[short] * 7, long)
    return text.map(lambda t: "".join(c for c in t if c not in exclude)) if exclude else text


def csv_writer(buffer: io.StringIO, newline: str, delimiter: str = ","):
    """A csv writer that quotes every field holding a line break (with lineterminator '\\n', Python's
    writer leaves a lone '\\r' unquoted, and any reader then sees a new row there)."""
    quoting = csv.QUOTE_MINIMAL if newline == "\r\n" else csv.QUOTE_ALL
    return csv.writer(buffer, delimiter=delimiter, lineterminator=newline, quoting=quoting)


def write_delimited(delimiter: str) -> Callable[[list[str], str], str]:
    def write(texts: list[str], newline: str) -> str:
        buffer = io.StringIO()
        writer = csv_writer(buffer, newline, delimiter)
        writer.writerow(["text", "label"])
        writer.writerows([text, index % 2] for index, text in enumerate(texts))
        return buffer.getvalue()

    return write


def write_tsv(texts: list[str], newline: str) -> str:
    """TSV as spreadsheets and `cut` write it: no quoting, so texts hold no tab or line break."""
    return "".join(f"{text}\t{label}{newline}" for text, label in [("text", "label"), *((t, i % 2) for i, t in enumerate(texts))])


TSV_UNSAFE = str.maketrans({"\t": " ", "\r": " ", "\n": " "})


def tsv_safe(texts: list[str]) -> list[str]:
    return [text.translate(TSV_UNSAFE) for text in texts]


def write_jsonl(texts: list[str], newline: str) -> str:
    return "".join(json.dumps({"text": t, "label": i % 2}, ensure_ascii=i % 2 == 0) + newline for i, t in enumerate(texts))


def write_scan_csv(texts: list[str], newline: str) -> str:
    buffer = io.StringIO()
    writer = csv_writer(buffer, newline)
    writer.writerow(["id", "text"])
    writer.writerows([i, t] for i, t in enumerate(texts))
    return buffer.getvalue()


def write_scan_jsonl(texts: list[str], newline: str) -> str:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + newline for t in texts)


def write_lines(texts: list[str], newline: str) -> str:
    return "".join(t + newline for t in texts)


def dataset_texts(path: Path) -> list[str]:
    return [example.text for example in read_split_file(path).examples]


def expect_dataset(texts: list[str]) -> list[str]:
    return [t.strip() for t in texts if t.strip()]


def refuse_nul(expected: Callable[[list[str]], list[str]]) -> Callable[[list[str]], list[str] | None]:
    return lambda texts: None if any("\x00" in t for t in texts) else expected(texts)


def expect_nonempty_dataset(texts: list[str]) -> list[str] | None:
    kept = expect_dataset(texts)
    return kept or None  # a split with no text at all is an error ("no examples")


def expect_nonempty_inputs(texts: list[str]) -> list[str] | None:
    return [t for t in texts if t.strip()] or None  # blank inputs are skipped (and counted), as in plain text


USER_FILE_READERS: list[UserFileReader] = [
    UserFileReader("dataset-csv", ".csv", dataset_texts, write_delimited(","), refuse_nul(expect_nonempty_dataset)),
    UserFileReader("dataset-tsv", ".tsv", dataset_texts, write_tsv, refuse_nul(expect_nonempty_dataset),
                   text_strategy=hostile_text(exclude="\t\r\n")),
    UserFileReader("dataset-jsonl", ".jsonl", dataset_texts, write_jsonl, expect_nonempty_dataset),
    UserFileReader("scan-csv", ".csv", lambda p: read_inputs(str(p)), write_scan_csv, refuse_nul(expect_nonempty_inputs)),
    UserFileReader("scan-jsonl", ".jsonl", lambda p: read_inputs(str(p)), write_scan_jsonl, expect_nonempty_inputs),
    UserFileReader(
        "scan-lines", ".txt", lambda p: read_inputs(str(p)), write_lines,
        refuse_nul(lambda texts: [t for t in texts if t.strip()] or None),
        # one text per line: no line breaks inside; a leading BOM would read as the file's BOM
        text_strategy=hostile_text(exclude="\r\n").filter(lambda t: not t.startswith("\ufeff")),
    ),
]
READER_IDS = [reader.name for reader in USER_FILE_READERS]


# --- checking one outcome ------------------------------------------------------------------------
SCRATCH = Path(tempfile.mkdtemp(prefix="peftguard-hostile-"))


@pytest.fixture(scope="module", autouse=True)
def _remove_scratch():
    yield
    shutil.rmtree(SCRATCH, ignore_errors=True)


def scratch(name: str) -> Path:
    """An empty folder reused by every example of a property (files can be megabytes)."""
    folder = SCRATCH / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def write_file(suffix: str, data: bytes) -> Path:
    path = scratch("file") / f"input{suffix}"
    path.write_bytes(data)
    return path


def assert_fails_cleanly(error: BaseException, path: Path | str) -> str:
    """A refusal must be a PeftguardError with a one-line message that names the file."""
    assert isinstance(error, PeftguardError), f"{type(error).__name__}: {error}"
    message = str(error)
    assert message and not re.search(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]", message), repr(message)
    assert str(path) in message, message
    return message


def outcome(read: Callable[[Path], list[str]], path: Path) -> list[str] | PeftguardError:
    """What ``read`` makes of ``path``: its texts, or the clean error it raised."""
    try:
        return read(path)
    except Exception as error:  # anything but a PeftguardError fails the property here
        assert_fails_cleanly(error, path)
        return error


def line_of(data: bytes, index: int) -> int:
    """The line (universal newlines: \\n, \\r\\n, \\r) holding byte ``index``."""
    return sum(piece.endswith((b"\n", b"\r")) for piece in data[:index].splitlines(keepends=True)) + 1


def first_fault_line(data: bytes) -> int:
    """The line of the first byte that is not UTF-8 or, in a valid file, of the first NUL."""
    body = data[len(BOM):] if data.startswith(BOM) else data
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return line_of(body, error.start)
    return line_of(body, body.index(b"\x00"))


def texts_for(reader: UserFileReader) -> st.SearchStrategy[list[str]]:
    return st.lists(hostile_text() if reader.text_strategy is None else reader.text_strategy, max_size=6)


def well_formed(reader: UserFileReader, texts: list[str], newline: str, bom: bool) -> bytes:
    assert reader.write is not None
    return (BOM if bom else b"") + reader.write(texts, newline).encode("utf-8")


# --- properties ----------------------------------------------------------------------------------
@pytest.mark.parametrize("reader", USER_FILE_READERS, ids=READER_IDS)
@PROPERTY_SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_parse_or_fail_cleanly(reader: UserFileReader, data: bytes) -> None:
    outcome(reader.read, write_file(reader.suffix, data))


@pytest.mark.parametrize("reader", [r for r in USER_FILE_READERS if r.write], ids=[r.name for r in USER_FILE_READERS if r.write])
@PROPERTY_SETTINGS
@given(data=st.data(), newline=st.sampled_from(["\n", "\r\n"]), bom=st.booleans())
def test_well_formed_files_round_trip(reader: UserFileReader, data: st.DataObject, newline: str, bom: bool) -> None:
    texts = data.draw(texts_for(reader))
    path = write_file(reader.suffix, well_formed(reader, texts, newline, bom))
    expected = reader.expect(texts)
    result = outcome(reader.read, path)
    if expected is None:
        assert isinstance(result, PeftguardError), f"{reader.name} accepted a file it must refuse: {result!r}"
    else:
        assert result == expected


def mutations(seed: bytes) -> st.SearchStrategy[tuple[str, bytes, int]]:
    """(kind, mutated bytes, index of the change) for a well-formed file."""
    index = st.integers(0, len(seed))
    return st.one_of(
        st.tuples(st.just("nul"), index).map(lambda k: ("nul", seed[: k[1]] + b"\x00" + seed[k[1]:], k[1])),
        st.tuples(st.sampled_from(INVALID_UTF8), index).map(lambda k: ("utf8", seed[: k[1]] + k[0] + seed[k[1]:], k[1])),
        index.map(lambda i: ("truncate", seed[:i], i)),
        st.tuples(st.sampled_from([b'"', b",", b"\t", b"\r", b"\n", b"{", b"\\"]), index).map(
            lambda k: ("insert", seed[: k[1]] + k[0] + seed[k[1]:], k[1])
        ),
        st.just(("drop-first-line", seed.split(b"\n", 1)[-1], 0)),
    )


def seed_files(reader: UserFileReader) -> st.SearchStrategy[bytes]:
    generated = [] if reader.write is None else [
        st.builds(lambda t, n, b: well_formed(reader, t, n, b), texts_for(reader), st.sampled_from(["\n", "\r\n"]), st.booleans())
    ]
    return st.one_of(*generated, *([st.sampled_from(reader.seeds)] if reader.seeds else []))


@pytest.mark.parametrize("reader", USER_FILE_READERS, ids=READER_IDS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_mutated_files_parse_or_fail_cleanly(reader: UserFileReader, data: st.DataObject) -> None:
    seed = data.draw(seed_files(reader))
    kind, mutated, index = data.draw(mutations(seed))
    path = write_file(reader.suffix, mutated)
    result = outcome(reader.read, path)
    if kind in ("nul", "utf8"):  # a NUL byte or a byte no UTF-8 text has: always refused, at its line
        assert isinstance(result, PeftguardError), f"{kind} at {index} accepted: {result!r}"
        message = str(result)
        assert f"line {first_fault_line(mutated)}" in message, message
        assert ("UTF-8" in message) if kind == "utf8" else ("NUL" in message or "JSON" in message or "UTF-8" in message)


# --- dataset specifics: labels, skipped texts, whole folders ---------------------------------------
@FOLDER_SETTINGS
@given(
    texts=st.lists(hostile_text(exclude="\x00"), min_size=1, max_size=8),
    num_labels=st.integers(2, 4),
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]),
)
def test_labels_round_trip_and_empty_texts_are_counted(texts: list[str], num_labels: int, suffix: str) -> None:
    texts = tsv_safe(texts) if suffix == ".tsv" else texts
    assume(any(t.strip() for t in texts))
    labels = [i % num_labels for i in range(len(texts))]
    path = write_file(suffix, render_dataset(suffix, texts, labels).encode("utf-8"))
    split = read_split_file(path)
    kept = [(t.strip(), label) for t, label in zip(texts, labels) if t.strip()]
    assert [(ex.text, ex.label) for ex in split.examples] == kept
    assert split.skipped_empty == len(texts) - len(kept)  # every dropped text is a blank one, counted


def render_dataset(suffix: str, texts: list[str], labels: list[object], columns: tuple[str, str] = ("text", "label")) -> str:
    if suffix == ".jsonl":
        return "".join(json.dumps({columns[0]: t, columns[1]: y}) + "\n" for t, y in zip(texts, labels))
    if suffix == ".tsv":
        return "".join(f"{t}\t{y}\r\n" for t, y in [columns, *zip(texts, labels)])
    buffer = io.StringIO()
    writer = csv_writer(buffer, "\r\n", "\t" if suffix == ".tsv" else ",")
    writer.writerow(columns)
    writer.writerows(zip(texts, labels))
    return buffer.getvalue()


@PROPERTY_SETTINGS
@given(label=st.one_of(
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=8),
    st.sampled_from(["1.0", "1_0", "+1", "٣", "１", "-1", "1e3", "9" * 5000, "nan", "true", "0x1"]),
))
def test_bad_labels_name_line_and_column(label: str) -> None:
    path = write_file(".csv", render_dataset(".csv", ["fine", "text"], [0, label]).encode("utf-8"))
    result = outcome(read_split_file, path)
    if isinstance(result, PeftguardError):
        assert "line 3, column 'label'" in str(result) or "no examples" in str(result)
    else:  # only a plain ASCII integer is a label
        assert re.fullmatch(r"\s*\+?[0-9]+\s*", label), label


@pytest.mark.parametrize(
    "value",
    [1.5, True, None, [1], {"a": 1}, "NaN", 10**30, float("inf")],
    ids=lambda v: type(v).__name__ + repr(v)[:10],
)
def test_jsonl_label_of_another_type_is_refused(value: object, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "ok", "label": 0}) + "\n" + json.dumps({"text": "x", "label": value}) + "\n")
    if value == 10**30:  # an integer, but the label space must be 0..K-1 with no gaps: see the folder test
        assert read_split_file(path).examples[-1].label == 10**30
        return
    with pytest.raises(DataError, match=r"line 2, column 'label'"):
        read_split_file(path)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "a\\ud800b", "label": 1}', "unpaired surrogate"),
        ("[" * 50_000, "invalid JSON"),
        ('{"text": "a", "label": ' + "9" * 5000 + "}", "line 1"),
        ('{"text": 5, "label": 1}', "expected a string"),
        ('["text", 1]', "JSON object"),
    ],
    ids=["surrogate", "deep-nesting", "huge-int", "text-not-string", "not-object"],
)
def test_hostile_jsonl_lines_fail_cleanly(line: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(PeftguardError) as error:
        read_split_file(path)
    assert message in assert_fails_cleanly(error.value, path)


def test_jsonl_keeps_unicode_line_separators_inside_texts(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    texts = ["a\u2028b", "c\x85d", "e\u2029f"]
    path.write_text(write_jsonl(texts, "\n").replace("\\u2028", "\u2028").replace("\\u2029", "\u2029"), encoding="utf-8")
    assert dataset_texts(path) == texts


@pytest.mark.parametrize(
    "content, message",
    [
        ('text,label\n"never closed,1\nnext,0\n', "malformed CSV"),
        ("sentence,label\nhello,1\n", "line 1, column 'text'"),
        ("hello,1\nbye,0\n", "missing column"),
        ("", "empty file"),
        ("\n\n", "missing column"),
    ],
    ids=["unclosed-quote", "wrong-header", "no-header", "empty", "blank-lines"],
)
def test_malformed_delimited_files_fail_cleanly(content: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / ("train.tsv" if "\t" in content else "train.csv")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_split_file(path)
    assert message in assert_fails_cleanly(error.value, path)


def test_tsv_reads_quotes_as_plain_characters(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text('text\tlabel\n"hello" he said\t1\n""\t0\nsay "hi\t1\n', encoding="utf-8")
    assert [(ex.text, ex.label) for ex in read_split_file(path).examples] == [('"hello" he said', 1), ('""', 0), ('say "hi', 1)]


def test_crlf_bom_and_cr_only_line_endings_give_the_same_rows(tmp_path: Path) -> None:
    rows = [('say "hi", then leave', 1), ("plain", 0)]
    expected = [(t, y) for t, y in rows]
    for name, newline, bom in (("lf", "\n", b""), ("crlf", "\r\n", BOM), ("cr", "\r", b"")):
        path = tmp_path / name / "train.csv"
        path.parent.mkdir()
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator=newline).writerows([("text", "label"), *rows])
        path.write_bytes(bom + buffer.getvalue().encode("utf-8"))
        assert [(ex.text, ex.label) for ex in read_split_file(path).examples] == expected, name


def write_folder(folder: Path, splits: dict[str, tuple[str, list[str], list[int]]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, (suffix, texts, labels) in splits.items():
        (folder / f"{split}{suffix}").write_text(render_dataset(suffix, texts, labels), encoding="utf-8")
    return folder


@FOLDER_SETTINGS
@given(
    suffixes=st.tuples(*[st.sampled_from([".csv", ".tsv", ".jsonl"])] * 3),
    texts=st.lists(hostile_text(exclude="\x00").filter(lambda t: t.strip()), min_size=2, max_size=6),
)
def test_dataset_folders_of_mixed_formats_round_trip(suffixes: tuple[str, str, str], texts: list[str]) -> None:
    texts = tsv_safe(texts) if ".tsv" in suffixes else texts
    assume(all(t.strip() for t in texts))
    labels = [i % 2 for i in range(len(texts))]
    folder = write_folder(scratch("folder"), {
        split: (suffix, texts, labels) for split, suffix in zip(("train", "dev", "test"), suffixes)
    })
    data = load_dataset(str(folder))
    assert data.num_labels == 2
    for split in (data.train, data.dev, data.test):
        assert [(ex.text, ex.label) for ex in split.examples] == [(t.strip(), y) for t, y in zip(texts, labels)]


@FOLDER_SETTINGS
@given(data=st.binary(max_size=200), split=st.sampled_from(["train", "dev", "test"]), suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_one_hostile_split_file_in_a_folder_fails_cleanly(data: bytes, split: str, suffix: str) -> None:
    good = {s: (".csv", ["good", "bad"], [0, 1]) for s in ("train", "dev", "test") if s != split}
    folder = write_folder(scratch("folder"), good)
    (folder / f"{split}{suffix}").write_bytes(data)
    try:
        load_dataset(str(folder))
    except Exception as error:
        assert_fails_cleanly(error, folder / f"{split}{suffix}")


@pytest.mark.parametrize(
    "train_labels, message",
    [
        ([1, 2, 1, 2], "line 3, column 'label': the training split has 2 distinct labels, so they must be 0..1; "
                       "label 2 (line 3) is outside that range and no row has label 0"),
        ([0, 10**12], "label 1000000000000 (line 3) is outside that range and no row has label 1"),
        ([0, 2, 0, 5, 7], "labels 5 (line 5), 7 (line 6) are outside that range and no row has label 1, 3"),
    ],
    ids=["one-based", "huge", "gap"],
)
def test_label_space_with_gaps_is_refused(train_labels: list[int], message: str, tmp_path: Path) -> None:
    texts = [f"text {i}" for i in range(len(train_labels))]
    folder = write_folder(tmp_path / "data", {
        "train": (".csv", texts, train_labels), "dev": (".csv", texts[:2], train_labels[:2]), "test": (".csv", texts[:2], train_labels[:2]),
    })
    with pytest.raises(DataError) as error:
        load_dataset(str(folder))
    assert message in assert_fails_cleanly(error.value, folder / "train.csv")


def test_configured_columns_are_named_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"sentence": "ok"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1, column 'y'"):
        read_split_file(path, Columns("sentence", "y"))


# --- scan inputs: stdin and suffixes ---------------------------------------------------------------
class FakeStdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


@PROPERTY_SETTINGS
@given(data=st.one_of(
    st.binary(max_size=200),
    st.lists(hostile_text(exclude="\r\n"), max_size=5).map(lambda texts: "\n".join(texts).encode("utf-8")),
))
def test_stdin_parses_or_fails_cleanly(data: bytes) -> None:
    saved = sys.stdin
    sys.stdin = FakeStdin(data)  # type: ignore[assignment]
    try:
        texts = read_inputs("-")
    except Exception as error:
        assert_fails_cleanly(error, "<stdin>")
    else:
        content = data.decode("utf-8-sig")
        assert texts == [line for line in re.split(r"\r\n|\r|\n", content) if line.strip()]
    finally:
        sys.stdin = saved


def test_scan_suffix_is_case_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "INPUTS.CSV"
    path.write_text("text,id\nhello,1\n", encoding="utf-8")
    assert read_inputs(str(path)) == ["hello"]


@pytest.mark.parametrize("source", ["missing.txt", "."], ids=["missing", "directory"])
def test_unreadable_scan_sources_fail_cleanly(source: str, tmp_path: Path) -> None:
    path = tmp_path / source
    with pytest.raises(DataError) as error:
        read_inputs(str(path))
    assert_fails_cleanly(error.value, path)


# --- through the command line: one line on stderr, exit 2, no traceback ---------------------------
@pytest.mark.parametrize(
    "content", [b"[" * 50_000 + b"\n", b'{"text": "a\\ud800"}\n', b"\xff\xfe{}\n"], ids=["deep-nesting", "surrogate", "utf-16"]
)
def test_cli_reports_a_hostile_scan_input_on_one_line(
    content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from peftguard.cli import main

    path = tmp_path / "inputs.jsonl"
    path.write_bytes(content)
    monkeypatch.setattr(sys, "argv", ["peftguard", "psim", "scan", "--psim", str(tmp_path / "psim"), "--input", str(path)])
    with pytest.raises(SystemExit) as exit_:
        main()
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in stderr
    assert stderr.startswith(f"error: {path}, line 1") and stderr.count("\n") == 1, stderr
