"""The study report: report.html, report.md and PNG figures in OUT/report/.

    write_report(out_dir) -> {file name: path}

reads OUT/study.json, the run folders and OUT/analysis/ (load.py), groups runs into arms
(arms.py), computes statistics (stats.py), tables (tables.py), findings (findings.py) and
figures (figures.py), and writes both renderings (html.py, markdown.py) and every table as CSV
(tables_csv.py) through the store.
"""

from __future__ import annotations

from pathlib import Path

from bnlab.report.compose import compose
from bnlab.report.html import render_html
from bnlab.report.load import load_study
from bnlab.report.markdown import render_markdown
from bnlab.report.references import builtin_path, load_references
from bnlab.report.tables_csv import write_table_csvs

REPORT_DIR = "report"


def write_report(out_dir: str | Path, references: str | Path | None = None) -> dict[str, Path]:
    """Write OUT/report/{report.html, report.md, *.png, tables/*.csv}; return the written files
    by name. `references`: a TOML file of published numbers (references.py); by default the one
    shipped for a built-in study of the same name, if any."""
    study = load_study(out_dir)
    path = references if references is not None else builtin_path(study.name)
    composed = compose(study, load_references(path) if path is not None else [])
    store = study.store
    written: dict[str, Path] = {}
    # Figures first: a reader who opens report.html while it is being replaced finds its images.
    for name, data in composed.images.items():
        written[name] = store.write_bytes(f"{REPORT_DIR}/{name}", data)
    written["report.md"] = store.write_bytes(f"{REPORT_DIR}/report.md",
                                             render_markdown(composed.document).encode())
    written["report.html"] = store.write_bytes(f"{REPORT_DIR}/report.html",
                                               render_html(composed.document).encode())
    written.update(write_table_csvs(store, composed.document, REPORT_DIR))
    return written


__all__ = ["write_report", "REPORT_DIR"]
