"""REPRODUCTION.md's generated tables quote committed result files word for word."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATED = sorted((REPO / "results").glob("*/table.md"))


@pytest.mark.parametrize("table", GENERATED, ids=lambda p: p.parent.name)
def test_every_row_of_a_generated_table_is_in_reproduction_md(table):
    record = (REPO / "REPRODUCTION.md").read_text(encoding="utf-8")
    rows = [line for line in table.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    assert rows, f"{table} has no rows"
    missing = [row for row in rows if row not in record]
    assert not missing, f"rows of {table.relative_to(REPO)} not in REPRODUCTION.md: {missing[:3]}"


def test_each_generated_table_has_its_cell_files():
    for table in GENERATED:
        cells = table.parent / "cells"
        assert (table.parent / "cells.csv").is_file() and cells.is_dir() and any(cells.iterdir()), table
