"""REPRODUCTION.md's tables quote committed result files (and the paper) and nothing else.

Generated tables (a ``<!-- results/<name>/table.md ... -->`` line above them) must match their file row by
row. Every other table says where its numbers come from on the line above it,
``<!-- sources: results/<folder or file> ... -->`` (``paper`` for a table that only quotes the paper), and
each decimal number in it must be found in those files: as stored, or as a share stored as a fraction (x100)
or the other way round, to the digits printed. Rows whose first cell, or columns whose header, starts with
"paper" quote the paper instead, and each of their decimal numbers must occur in the paper's text (checked
where the shared folder has the paper). Whole numbers (sizes, steps, counts) are not checked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

from peftguard.data import default_data_dir

from conftest import REPO

RECORD = REPO / "REPRODUCTION.md"
BENCHMARKS = REPO / "BENCHMARKS.md"  # its tables are checked where they name their sources (older ones predate the rule)
GENERATED = sorted((REPO / "results").glob("*/table.md"))
SOURCES = re.compile(r"^<!-- sources: (?P<paths>.+?) -->$")
DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d+(?=x?(?![\w.]))")  # a ratio's "x" (1.45x) ends a number too
STORED_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
SOURCE_SUFFIXES = (".json", ".csv", ".md", ".txt")


@dataclass(frozen=True)
class Table:
    line: int  # 1-based line of the header row
    above: str  # the line above the table
    header: list[str]
    rows: list[list[str]]


def tables(text: str) -> list[Table]:
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("| ") and (i == 0 or not lines[i - 1].startswith("|")):
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in lines[i:end]]
            found.append(Table(i + 1, lines[i - 1].strip() if i else "", cells[0], cells[2:]))
            i = end
        else:
            i += 1
    return found


def is_generated(table: Table) -> bool:
    return table.above.startswith("<!-- results/") and "/table.md" in table.above


def is_result_file(path: Path) -> bool:
    return any(REPO / folder in path.parents for folder in ("results", "bench"))


@lru_cache(maxsize=None)
def stored_numbers(path: Path) -> frozenset[float]:
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.suffix in SOURCE_SUFFIXES)
    return frozenset(float(m) for f in files for m in STORED_NUMBER.findall(f.read_text(encoding="utf-8")))


def found_in(printed: str, stored: frozenset[float]) -> bool:
    value, tolerance = float(printed), 0.5 * 10 ** -len(printed.split(".")[1]) + 1e-9
    return any(abs(candidate - value) <= tolerance for x in stored for candidate in (x, 100 * x, x / 100))


@lru_cache(maxsize=None)
def paper_text() -> str | None:
    data = default_data_dir()
    papers = sorted((data.parent / "paper").glob("*.txt")) if data else []
    return "\n".join(p.read_text(encoding="utf-8") for p in papers) or None


def quotes_paper(label: str) -> bool:
    return label.lower().startswith("paper")


def unfound_numbers(table: Table, stored: frozenset[float], paper: str | None) -> list[str]:
    missing = []
    for row in table.rows:
        for header, cell in zip(table.header, row):
            for printed in DECIMAL.findall(cell):
                if quotes_paper(row[0]) or quotes_paper(header):
                    if paper is not None and printed not in paper:
                        missing.append(f"{printed} (paper)")
                elif not found_in(printed, stored):
                    missing.append(f"{printed} ({header})")
    return missing


HAND_ASSEMBLED = [t for t in tables(RECORD.read_text(encoding="utf-8")) if not is_generated(t)]
SOURCED_BENCHMARKS = [t for t in tables(BENCHMARKS.read_text(encoding="utf-8")) if SOURCES.match(t.above)]


@pytest.mark.parametrize("table", GENERATED, ids=lambda p: p.parent.name)
def test_every_row_of_a_generated_table_is_in_reproduction_md(table):
    record = RECORD.read_text(encoding="utf-8")
    rows = [line for line in table.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    assert rows, f"{table} has no rows"
    missing = [row for row in rows if row not in record]
    assert not missing, f"rows of {table.relative_to(REPO)} not in REPRODUCTION.md: {missing[:3]}"


def test_each_generated_table_has_its_cell_files():
    for table in GENERATED:
        cells = table.parent / "cells"
        assert (table.parent / "cells.csv").is_file() and cells.is_dir() and any(cells.iterdir()), table


@pytest.mark.parametrize("table", HAND_ASSEMBLED, ids=lambda t: f"line{t.line}")
def test_every_number_of_a_hand_assembled_table_is_in_its_sources(table):
    check_sources(table, RECORD.name)


@pytest.mark.parametrize("table", SOURCED_BENCHMARKS, ids=lambda t: f"line{t.line}")
def test_every_number_of_a_sourced_benchmark_table_is_in_its_sources(table):
    check_sources(table, BENCHMARKS.name)


def check_sources(table: Table, document: str) -> None:
    declared = SOURCES.match(table.above)
    assert declared, f"{document} line {table.line}: the table has no <!-- sources: ... --> line above it"
    paths = [REPO / p for p in declared["paths"].split() if p != "paper"]
    absent = [str(p.relative_to(REPO)) for p in paths if not (p.exists() and is_result_file(p))]
    assert not absent, f"{document} line {table.line}: sources outside results/ or bench/, or absent: {absent}"
    stored = frozenset().union(*(stored_numbers(p) for p in paths))
    missing = unfound_numbers(table, stored, paper_text())
    assert not missing, f"{document} line {table.line}: numbers not in {declared['paths']}: {missing[:12]}"


def test_the_number_check_can_fail():
    table = Table(1, "", ["row", "CA"], [["ours", "83.69"], ["paper BERT", "93.06"]])
    assert unfound_numbers(table, frozenset({0.8369}), "93.06") == []
    assert unfound_numbers(table, frozenset({0.8371}), "93.06") == ["83.69 (CA)"]
    ratio = Table(1, "", ["case", "vs fp32"], [["int8", "0.92x"]])
    assert unfound_numbers(ratio, frozenset({0.918}), None) == []
    assert unfound_numbers(ratio, frozenset({0.93}), None) == ["0.92 (vs fp32)"]
    assert unfound_numbers(table, frozenset({83.69}), "92.00") == ["93.06 (paper)"]
