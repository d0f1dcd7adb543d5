"""What bnlab prints: aligned tables and short durations on a terminal, CSV and JSON for other
tools."""

from __future__ import annotations

import csv
import io
import json
import math
import re


def format_table(head: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, a dashed rule under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def fmt_time(seconds: float | None) -> str:
    """'42s', '3m05s', '2h07m'; '?' for an unknown time."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# -- exports -----------------------------------------------------------------------------------
FORMATS = ("table", "csv", "json")  # --format of `bnlab runs` and `bnlab study status`


# A spreadsheet takes a cell that starts with one of these for a formula (OWASP, "CSV
# Injection"); a dataset path or a run's name can start with one
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def safe_cell(v):
    """A CSV cell that no spreadsheet runs as a formula: text starting with = + - @, a tab or a
    carriage return gets a leading single quote, as OWASP recommends (a spreadsheet shows the
    text as it was); numbers, and text that is just a number ("-0.5"), are left as they are."""
    if isinstance(v, str) and v.startswith(FORMULA_START) and not _NUMBER.match(v):
        return "'" + v
    return v


def csv_text(head: list[str], rows: list[list]) -> str:
    """RFC 4180 CSV with a header line; None is an empty cell, other values as str() gives them
    (floats at full precision), text through `safe_cell`. Every CSV file bnlab writes is made
    here."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([safe_cell(str(h)) for h in head])
    w.writerows([["" if v is None else safe_cell(v) for v in r] for r in rows])
    return buf.getvalue()


def records_csv(records: list[dict]) -> str:
    """CSV of dicts: columns in order of first appearance; tables (dicts) as JSON text."""
    if not records:
        return ""
    head = list(dict.fromkeys(k for r in records for k in r))
    return csv_text(head, [[_cell(r.get(k)) for k in head] for r in records])


def records_json(records: list[dict]) -> str:
    """A JSON array of the records; non-finite numbers are null (JSON has no NaN)."""
    return json.dumps(_finite(records), indent=2) + "\n"


def _cell(v):
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
