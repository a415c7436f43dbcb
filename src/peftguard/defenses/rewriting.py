"""Shared parts of the rewriting defenses (back-translation, SCPD): they hand the victim new texts.

A rewriting defense flags nothing; CA and ASR are measured on the rewritten clean and triggered
test sets. Rewrites can also be read from files made elsewhere (``precomputed``): a clean file
aligned row by row with the dataset's test split, and a triggered file aligned row by row with the
test split's non-target rows (the ASR set), as in the PSIM authors' ``paraphrase_defense`` files.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftguard.data import read_rows
from peftguard.defenses.base import DefenseContext, InputDefense, Screened
from peftguard.errors import DataError, OptionError

Rewrite = Callable[[list[str]], list[str]]
Row = tuple[str, int | None, int]  # stripped text, label (None when the file has none), line


class RewritingDefense(InputDefense):
    """An input defense that rewrites every text with ``rewrite`` and flags none."""

    def __init__(self, name: str, rewrite: Rewrite, settings: dict[str, Any]) -> None:
        self.name, self.rewrite, self.settings = name, rewrite, settings
        self._memo: dict[str, str] = {}

    def screen(self, texts: Sequence[str], *, desc: str | None = None) -> Screened:
        missing = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if missing:
            rewritten = self.rewrite(missing)
            if len(rewritten) != len(missing):
                raise RuntimeError(f"{self.name}: {len(rewritten)} rewrites for {len(missing)} texts")  # a bug
            self._memo.update(zip(missing, rewritten))
        return Screened([self._memo[t] for t in texts])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.settings}


# What the shipped ``paraphrase_defense/test_char_*.csv`` files carry (data/SOURCES.md): the label-1
# test rows with the BadNet word ``mn`` inserted (at the authors' positions), then rewritten.
SHIPPED_TRIGGER = {"attack": "badnet", "words": ["mn"], "count": 1}
SHIPPED_FOLDER = "paraphrase_defense"


@dataclass
class PrecomputedRewrites:
    """Test text (clean, or triggered as this tool triggers it) → its precomputed rewrite."""

    mapping: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def __call__(self, texts: list[str]) -> list[str]:
        unknown = [t for t in texts if t not in self.mapping]
        if unknown:
            raise DataError(
                self.files.get("clean", "precomputed file"), f"no precomputed rewrite for {len(unknown)} text(s), "
                f"e.g. {unknown[0][:60]!r}; precomputed files cover the dataset's test split (and its triggered "
                "version) only"
            )
        return [self.mapping[t] for t in texts]


def precomputed_backend(
    context: DefenseContext, clean: Path | None, triggered: Path | None, shipped_names: tuple[str, str], what: str
) -> tuple[PrecomputedRewrites, dict[str, Any]]:
    """Rewrites from ``clean``/``triggered`` files, by default the dataset's shipped ``shipped_names``."""
    shipped = clean is None
    if shipped:
        if triggered is not None:
            raise OptionError("--precomputed-triggered needs --precomputed (the clean test rewrites) too")
        folder = Path(context.dataset.test.source).parent / SHIPPED_FOLDER
        clean, triggered = folder / shipped_names[0], folder / shipped_names[1]
        if not clean.is_file():
            raise OptionError(f"no precomputed {what} for dataset '{context.dataset.name}' (no {clean}); "
                              "give --precomputed FILE")
        if not triggered.is_file():
            triggered = None
    rewrites = load_precomputed(context, clean, triggered, shipped=shipped)
    return rewrites, {"backend": "precomputed", **rewrites.files}


def load_precomputed(
    context: DefenseContext, clean_file: Path, triggered_file: Path | None, *, shipped: bool
) -> PrecomputedRewrites:
    """Read rewrites aligned with the test split; row-count or label mismatches are errors.

    ``shipped`` marks the dataset's own files, whose triggered texts carry BadNet ``mn`` only.
    """
    dataset, triggers = context.dataset, context.triggers
    test_path = Path(dataset.test.source)
    if not test_path.is_file():
        raise OptionError(f"dataset '{dataset.name}' is not a folder of files; precomputed rewrites need its test file")
    label_column = dataset.test.label_column
    test_rows = _rows(test_path, label_column)
    clean_rows = _rows(clean_file, label_column)
    _check_aligned(clean_file, clean_rows, test_path, test_rows, "the test split")
    rewrites = PrecomputedRewrites(files={"clean": str(clean_file)})
    for (text, _, _), (rewrite, _, _) in zip(test_rows, clean_rows):
        if text:
            rewrites.mapping.setdefault(text, rewrite)
    if not triggers:
        return rewrites
    if triggered_file is None:
        raise OptionError(
            "precomputed rewrites of the triggered test set are missing: give --precomputed-triggered FILE "
            "(aligned with the test split's non-target rows)"
        )
    if shipped and any(t.describe() != SHIPPED_TRIGGER for t in triggers):
        raise OptionError(
            f"{triggered_file.name} holds texts with the BadNet word 'mn' (data/SOURCES.md), not "
            f"{' + '.join(t.name for t in triggers)} triggers; give --precomputed and --precomputed-triggered "
            "files made for this attack"
        )
    non_target = [row for row in test_rows if row[1] != context.target_label]
    triggered_rows = _rows(triggered_file, label_column)
    _check_aligned(triggered_file, triggered_rows, test_path, non_target,
                   f"the rows whose label is not the target {context.target_label}")
    rewrites.files["triggered"] = str(triggered_file)
    for (text, _, _), (rewrite, _, _) in zip(non_target, triggered_rows):
        if text:
            for trigger in triggers:
                rewrites.mapping.setdefault(trigger.triggered(text, context.seed), rewrite)
    return rewrites


def _rows(path: Path, label_column: str) -> list[Row]:
    """Every row of a file, empty texts included (they keep rows aligned)."""
    try:
        records = read_rows(path, ("text", label_column))
        return [(str(r["text"]).strip(), _int(r[label_column]), line) for line, r in records]
    except DataError as exc:
        if exc.column != label_column:
            raise
    return [(str(r["text"]).strip(), None, line) for line, r in read_rows(path, ("text",))]


def _int(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _check_aligned(path: Path, rows: list[Row], reference: Path, expected: list[Row], what: str) -> None:
    if len(rows) != len(expected):
        raise DataError(
            path, f"has {len(rows)} rows but {what} of {reference} has {len(expected)}; precomputed rewrites "
            "must be aligned with it row by row"
        )
    for row, ((_, label, line), (_, wanted, _)) in enumerate(zip(rows, expected)):
        if label is not None and wanted is not None and label != wanted:
            raise DataError(
                path, f"label {label}, but row {row + 1} of {what} of {reference} has label {wanted}; "
                "the rows are not aligned", line=line,
            )
