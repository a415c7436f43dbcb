"""Datasets: local folders (CSV, TSV, JSONL) or hub names, validated row by row.

A dataset is three splits of :class:`Example` (text, integer label). Short names such as
``sst2`` resolve to sub-folders of the data directory (``--data-dir``, ``PEFTGUARD_DATA``, or
``../shared/data`` when it exists). Anything else is a hub dataset, written
``name[:config][@revision]`` (``nyu-mll/glue:sst2@<commit>``): a config picks one of a dataset's
subsets, a revision (branch, tag or commit) pins what is read. Every problem with a file is reported
with the file, line and column; empty texts are skipped and counted, never silently.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from peftguard.errors import DataError, PeftguardError

log = logging.getLogger(__name__)

SHORT_NAMES = ("sst2", "cr", "cola", "mr", "imdb", "agnews")
SPLITS = ("train", "dev", "test")
SUFFIXES = (".csv", ".tsv", ".jsonl")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what the csv module and plain-text reading count as a new line
_LABEL = re.compile(r"[+-]?[0-9]{1,18}")  # ASCII digits; int() would also take '1_0', '٣' and 5000 digits
# csv refuses fields over 128 KiB by default; a long review is still a text (truncated later, counted).
csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))
_SPLIT_ALIASES = {"dev": ("dev", "validation", "valid")}
# Names the `datasets` library takes as a file-format builder that globs the current folder, not a hub dataset.
FILE_FORMAT_NAMES = {"csv", "tsv", "json", "jsonl", "text", "txt", "parquet", "arrow", "pandas", "sql", "xml",
                     "webdataset", "imagefolder", "audiofolder", "videofolder", "pdffolder", "generator", "cache"}
_HUB_SPEC = re.compile(r"(?P<name>[^:@]+)(?::(?P<config>[^:@]+))?(?:@(?P<revision>[^:@]+))?")
UNLABELED = -1  # the label of a split published without labels (GLUE's test splits)
DEV_CARVE_SEED = 0  # seed of the dev split carved from train when the test split has no labels


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass
class Split:
    """One split's examples and what was skipped while reading it."""

    name: str
    examples: list[Example]
    source: str
    skipped_empty: int = 0
    lines: list[int] = field(default_factory=list)  # source line of each example, for errors
    label_column: str = "label"

    def __len__(self) -> int:
        return len(self.examples)


@dataclass
class TextDataset:
    name: str
    train: Split
    dev: Split
    test: Split
    num_labels: int
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> Split:
        return {"train": self.train, "dev": self.dev, "test": self.test}[name]


@dataclass(frozen=True)
class Columns:
    text: str = "text"
    label: str = "label"


def default_data_dir() -> Path | None:
    """The data directory from ``PEFTGUARD_DATA``, else ``../shared/data`` if it exists."""
    env = os.environ.get("PEFTGUARD_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


@dataclass(frozen=True)
class HubSpec:
    """A hub dataset as ``name[:config][@revision]``."""

    name: str
    config: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.name + (f":{self.config}" if self.config else "") + (f"@{self.revision}" if self.revision else "")


def parse_hub_spec(spec: str) -> HubSpec:
    """``name[:config][@revision]`` as its parts; an empty or repeated part is an error."""
    match = _HUB_SPEC.fullmatch(spec)
    if match is None:
        raise PeftguardError(f"dataset '{spec}': a hub dataset is written name[:config][@revision], "
                             "such as nyu-mll/glue:sst2@main")
    return HubSpec(match["name"], match["config"], match["revision"])


def resolve_dataset_path(name: str, data_dir: str | Path | None = None) -> Path | HubSpec:
    """Map a short name or folder to a local folder; anything else is taken as a hub dataset.

    A short name may name a subset folder inside it, such as ``imdb/psim`` (the paper's IMDB subset).
    """
    if name.split("/")[0] in SHORT_NAMES and not Path(name).is_dir():
        root = Path(data_dir) if data_dir else default_data_dir()
        if root is None:
            raise PeftguardError(
                f"dataset '{name}' is a short name but no data directory is known: "
                "pass --data-dir or set PEFTGUARD_DATA"
            )
        folder = root / name
        if not folder.is_dir():
            raise PeftguardError(f"dataset '{name}': folder {folder} does not exist")
        return folder
    path = Path(name)
    if path.is_dir():
        return path
    if path.exists():
        raise PeftguardError(f"dataset '{name}' is a file; give the folder holding train/dev/test")
    spec = parse_hub_spec(name)
    if spec.name.lower() in FILE_FORMAT_NAMES:
        raise PeftguardError(f"dataset '{name}' names a file format, not a dataset (the hub would read every such file "
                             "in the current folder); give the folder holding train/dev/test files")
    if spec.name.split("/")[0] in SHORT_NAMES:
        raise PeftguardError(f"dataset '{name}': '{spec.name}' is the short name of a local folder; a config or "
                             "revision is for hub datasets (give the hub id, such as stanfordnlp/sst2@main)")
    return spec


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    columns: Columns = Columns(),
    num_labels: int | None = None,
) -> TextDataset:
    """Load a dataset by short name, folder or hub name, validating every row."""
    location = resolve_dataset_path(name, data_dir)
    if isinstance(location, HubSpec):
        return _load_hub_dataset(location, columns, num_labels)
    splits = {split: read_split_file(find_split_file(location, split), columns, split) for split in SPLITS}
    return _assemble(name, splits, num_labels)


def find_split_file(folder: Path, split: str) -> Path:
    for stem in _SPLIT_ALIASES.get(split, (split,)):
        for suffix in SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    raise DataError(folder / f"{split}.csv", f"missing file: no {split} split ({'/'.join(SUFFIXES)}) in {folder}")


def read_split_file(path: Path, columns: Columns = Columns(), split: str = "train") -> Split:
    """Read one CSV/TSV/JSONL file of (text, label) rows."""
    rows = read_rows(path, (columns.text, columns.label))
    examples, lines, skipped = [], [], 0
    for line, record in rows:
        text = record[columns.text]
        if not isinstance(text, str):
            raise DataError(path, f"text is {type(text).__name__}, expected a string", line=line, column=columns.text)
        text = text.strip()
        if not text:
            skipped += 1
            continue
        label = parse_label(record[columns.label], path, line, columns.label)
        examples.append(Example(text, label))
        lines.append(line)
    if skipped:
        log.warning("%s: skipped %d empty text(s)", path, skipped)
    if not examples:
        raise DataError(path, "no examples (the file is empty or every text is empty)")
    return Split(split, examples, str(path), skipped, lines, columns.label)


def read_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, object]]]:
    """Rows of a CSV/TSV (with header) or JSONL file as (line number, record)."""
    content = read_utf8(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path, content, required)
    delimiter = "\t" if suffix == ".tsv" else ","
    return _delimited_rows(path, content, delimiter, required)


def read_utf8(path: Path) -> str:
    """Decode a file as UTF-8 (a BOM is dropped), naming the line of the first bad byte."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "missing file") from None
    except OSError as exc:
        raise DataError(path, f"cannot read: {exc.strerror}") from None
    return decode_utf8(raw, path)


def decode_utf8(raw: bytes, source: str | Path) -> str:
    """``raw`` as text, without a leading BOM; a bad byte is reported with its line."""
    body = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:  # exc.start counts from after the BOM
        raise DataError(
            source, f"not valid UTF-8 (byte 0x{body[exc.start]:02x}); re-save it as UTF-8", line=line_at(body, exc.start)
        ) from None


def line_at(content: str | bytes, index: int) -> int:
    """The line holding position ``index``, counting \\n, \\r\\n and \\r as line breaks."""
    prefix = content[:index]
    text = prefix.decode("latin-1") if isinstance(prefix, bytes) else prefix
    return len(_LINE_BREAK.findall(text)) + 1


def split_lines(content: str) -> list[str]:
    """Lines split at \\n, \\r\\n or \\r only (str.splitlines also splits at \\x0b, \\x85, U+2028, ...)."""
    return _LINE_BREAK.split(content)


def check_nul(content: str, path: str | Path) -> None:
    if "\x00" in content:
        raise DataError(path, "contains a NUL byte", line=line_at(content, content.index("\x00")))


def _delimited_rows(
    path: Path, content: str, delimiter: str, required: tuple[str, ...]
) -> list[tuple[int, dict[str, object]]]:
    check_nul(content, path)
    # CSV: strict, so a stray quote is an error, not a silently altered text or rows merged into one field.
    # TSV: no quoting at all (a tab or line break ends a field, a quote is just a character), as TSV files are written.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, strict=True, quoting=quoting)
    start = 1  # the line where the record being read starts (a quoted field can span lines)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(path, "empty file: expected a header row with " + ", ".join(required))
        header = [name.strip() for name in header]
        missing = [name for name in required if name not in header]
        if missing:
            raise DataError(
                path,
                f"missing column(s) {', '.join(repr(m) for m in missing)}; header has {header}",
                line=1,
                column=missing[0],
            )
        positions = {name: header.index(name) for name in required}
        rows = []
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not cells:
                continue
            record: dict[str, object] = {}
            for name, position in positions.items():
                if position >= len(cells):
                    raise DataError(path, f"row has {len(cells)} field(s), no value", line=line, column=name)
                record[name] = cells[position]
            rows.append((line, record))
    except csv.Error as exc:
        raise DataError(path, f"malformed {('TSV' if delimiter == chr(9) else 'CSV')}: {exc}", line=start) from None
    return rows


def _jsonl_rows(path: Path, content: str, required: tuple[str, ...]) -> list[tuple[int, dict[str, object]]]:
    check_nul(content, path)  # before parsing: a NUL is named as such, at its line, whatever JSON surrounds it
    rows = []
    # JSON Lines ends records at \n only: U+2028 and friends are legal inside JSON strings
    for line, raw in enumerate(content.split("\n"), start=1):
        if not raw.strip():
            continue
        record = _json_line(path, raw, line)
        for name in required:
            if name not in record:
                raise DataError(path, "missing key", line=line, column=name)
            check_encodable(record[name], path, line, name)
        rows.append((line, record))
    return rows


def _json_line(path: Path, raw: str, line: int) -> dict[str, object]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(path, f"invalid JSON: {exc.msg} (character {exc.colno})", line=line) from None
    except (ValueError, RecursionError) as exc:  # integers over 4300 digits, nesting too deep
        raise DataError(path, f"invalid JSON: {str(exc).partition(':')[0]}", line=line) from None
    if not isinstance(record, dict):
        raise DataError(path, "each line must be a JSON object", line=line)
    return record


def check_encodable(value: object, path: str | Path, line: int, column: str) -> None:
    """Refuse a string with an unpaired surrogate (a JSON escape such as \\ud800): no file or model can hold it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(
                path, f"unpaired surrogate {value[exc.start]!r} at character {exc.start + 1}", line=line, column=column
            ) from None


def parse_label(value: object, path: Path, line: int, column: str) -> int:
    if isinstance(value, bool):
        raise DataError(path, f"label {value!r} is not an integer", line=line, column=column)
    if isinstance(value, int):
        label = value
    else:
        text = str(value).strip()
        if not _LABEL.fullmatch(text):
            raise DataError(path, f"label {text[:40]!r} is not an integer class index", line=line, column=column)
        label = int(text)
    if label < 0:
        raise DataError(path, f"label {label} is negative", line=line, column=column)
    return label


def _assemble(name: str, splits: dict[str, Split], num_labels: int | None) -> TextDataset:
    inferred = max(example.label for example in splits["train"].examples) + 1
    if num_labels is None:
        _check_label_space(splits["train"], inferred)
    num_labels = num_labels or inferred
    if num_labels < 2:
        raise DataError(splits["train"].source, f"only one label ({inferred - 1}) in the training split")
    for split in splits.values():
        _check_label_range(split, num_labels)
    notes = [f"{s.name}: skipped {s.skipped_empty} empty text(s)" for s in splits.values() if s.skipped_empty]
    return TextDataset(name, splits["train"], splits["dev"], splits["test"], num_labels, notes)


def _check_label_space(train: Split, inferred: int) -> None:
    """Inferred labels must be 0..K-1, each present in training (1-based or sparse labels are errors).

    With K distinct labels, those at K or above are the wrong ones: the error names the first row of
    each (at most three) and the labels below K that no row has.
    """
    present = set(label_counts(train.examples))
    if len(present) == inferred:
        return
    count = len(present)
    first_row: dict[int, int] = {}
    for index, example in enumerate(train.examples):
        if example.label >= count and example.label not in first_row:
            first_row[example.label] = train.lines[index] if train.lines else index + 1
    wrong = sorted(first_row)
    shown = ", ".join(f"{label} (line {first_row[label]})" for label in wrong[:3]) + (
        f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
    missing = [label for label in range(count) if label not in present]
    raise DataError(
        train.source,
        f"the training split has {count} distinct labels, so they must be 0..{count - 1}; label{'s' if len(wrong) > 1 else ''} "
        f"{shown} {'are' if len(wrong) > 1 else 'is'} outside that range and no row has label "
        f"{', '.join(map(str, missing[:3]))}{' and more' if len(missing) > 3 else ''}",
        line=first_row[wrong[0]], column=train.label_column,
    )


def _check_label_range(split: Split, num_labels: int) -> None:
    for index, example in enumerate(split.examples):
        if example.label >= num_labels:
            raise DataError(
                split.source,
                f"label {example.label} is out of range 0..{num_labels - 1}",
                line=split.lines[index] if split.lines else None,
                column=split.label_column,
            )


def _load_hub_dataset(spec: HubSpec, columns: Columns, num_labels: int | None) -> TextDataset:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise PeftguardError("hub datasets need the 'datasets' package") from exc
    try:
        hub = datasets.load_dataset(spec.name, spec.config, revision=spec.revision)
    except Exception as exc:  # the hub raises many kinds; all mean "cannot get it"
        raise PeftguardError(
            f"dataset '{spec}' is neither a short name ({', '.join(SHORT_NAMES)}), a folder, "
            f"nor a loadable hub dataset: {exc}"
        ) from None
    names = {split: _hub_split_name(hub, split, spec) for split in SPLITS}
    for hub_name in names.values():
        present = hub[hub_name].column_names
        if (missing := [c for c in (columns.text, columns.label) if c not in present]):
            raise DataError(f"hub:{spec}/{hub_name}", f"missing column; has {present}", column=missing[0])
    if not is_unlabeled(hub[names["test"]][columns.label]):
        splits = {split: _hub_split(hub[hub_name], split, f"hub:{spec}/{hub_name}", columns)
                  for split, hub_name in names.items()}
        return _assemble(str(spec), splits, num_labels)
    train = _hub_split(hub[names["train"]], "train", f"hub:{spec}/{names['train']}", columns)
    labelled = _hub_split(hub[names["dev"]], "test", f"hub:{spec}/{names['dev']}", columns)
    train, dev, test, note = remap_unlabeled_test(train, labelled)
    dataset = _assemble(str(spec), {"train": train, "dev": dev, "test": test}, num_labels)
    dataset.notes.insert(0, note)
    return dataset


def _hub_split_name(hub: object, split: str, spec: HubSpec) -> str:
    hub_name = next((alias for alias in _SPLIT_ALIASES.get(split, (split,)) if alias in hub), None)
    if hub_name is None:
        raise PeftguardError(f"hub dataset '{spec}' has no {split} split (has {list(hub)})")
    return hub_name


def _hub_split(rows: object, split: str, source: str, columns: Columns) -> Split:
    examples, skipped = [], 0
    for index, row in enumerate(rows):
        text = str(row[columns.text]).strip()
        if not text:
            skipped += 1
            continue
        examples.append(Example(text, parse_label(row[columns.label], Path(source), index + 1, columns.label)))
    return Split(split, examples, source, skipped, list(range(1, len(examples) + 1)), columns.label)


def is_unlabeled(labels: object) -> bool:
    """Whether a split was published without labels: every label is missing or -1 (GLUE's test splits)."""
    values = list(labels)
    return bool(values) and all(value is None or (not isinstance(value, bool) and value == UNLABELED)
                                for value in values)


def remap_unlabeled_test(train: Split, labelled: Split, seed: int = DEV_CARVE_SEED) -> tuple[Split, Split, Split, str]:
    """Train, dev and test when the published test split has no labels.

    The labelled validation split becomes the test split (it is what papers report on GLUE), and
    dev, which picks epochs and calibrates thresholds, is carved from train: as many examples as
    validation has, at most a tenth of train, drawn from ``seed`` so every run carves the same rows.
    """
    if len(train) < 2:
        raise DataError(train.source, "too few training examples to carve a dev split from")
    size = min(len(labelled), max(1, len(train) // 10))
    carved = set(random.Random(seed).sample(range(len(train)), size))
    dev = _take(train, sorted(carved), "dev")
    kept = _take(train, [i for i in range(len(train)) if i not in carved], "train")
    note = (f"test: the published test split has no labels, so the labelled {labelled.source} ({len(labelled)}) "
            f"is the test split; dev: {size} examples carved from train (seed {seed}), train keeps {len(kept)}")
    return kept, dev, replace(labelled, name="test"), note


def _take(split: Split, indices: list[int], name: str) -> Split:
    """The rows ``indices`` of ``split`` (in order) as a split called ``name`` (its skipped count stays with train)."""
    return replace(split, name=name, examples=[split.examples[i] for i in indices],
                   lines=[split.lines[i] for i in indices] if split.lines else [],
                   skipped_empty=split.skipped_empty if name == split.name else 0)


def subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """At most ``limit`` examples drawn reproducibly from ``seed``, in their original order."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit <= 0:
        raise PeftguardError(f"sample limit must be positive, got {limit}")
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


def label_counts(examples: list[Example]) -> dict[int, int]:
    return dict(sorted(Counter(example.label for example in examples).items()))
