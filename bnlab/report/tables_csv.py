"""The report's tables as CSV files beside report.md: OUT/report/tables/<anchor>.csv.

Cells are the report's own text (accuracies in percent, "mean ± std", intervals as "[lo, hi]"),
so a table pasted from the CSV says exactly what the report says. A numbered table's first
column "#" is the row number the report's sentences cite ("Table 1, row 2").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from bnlab.console import csv_text
from bnlab.report.document import Document, Table

TABLES_DIR = "tables"


def file_name(t: Table) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", t.anchor).strip("._") or f"table-{t.number}"
    return f"{stem}.csv"


def table_csv(t: Table) -> str:
    head = (["#"] if t.numbered_rows else []) + list(t.head)
    rows = [([i] if t.numbered_rows else []) + list(r) for i, r in enumerate(t.rows, 1)]
    return csv_text(head, rows)


def write_table_csvs(doc: Document, write: Callable[[str, bytes], Path]) -> dict[str, Path]:
    """Write every table of `doc` as tables/<anchor>.csv with `write(relative name, bytes)`
    (the report's own writer, atomic); return them by relative name."""
    written: dict[str, Path] = {}
    for t in doc.tables:
        name = f"{TABLES_DIR}/{file_name(t)}"
        if name in written:  # two tables under one anchor: the later one by its number
            name = f"{TABLES_DIR}/{file_name(t)[:-4]}-{t.number}.csv"
        written[name] = write(name, table_csv(t).encode())
    return written
