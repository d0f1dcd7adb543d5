"""The study report: report.html, report.md and PNG figures in OUT/report/.

    write_report(out_dir, report_dir=None) -> {file name: path}

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
from bnlab.report.tables_csv import TABLES_DIR, write_table_csvs
from bnlab.store import atomic_write_bytes

REPORT_DIR = "report"


def write_report(out_dir: str | Path, report_dir: str | Path | None = None,
                 references: str | Path | None = None) -> dict[str, Path]:
    """Write {report.html, report.md, *.png, tables/*.csv} into `report_dir` (default
    OUT/report; another folder for a study on read-only storage); return the written files by
    name. PNG figures and table CSVs of an earlier report in that folder that this one does not
    write are removed. `references`: a TOML file of published numbers (references.py); by
    default the one shipped for a built-in study of the same name, if any."""
    study = load_study(out_dir)
    path = references if references is not None else builtin_path(study.name)
    composed = compose(study, load_references(path) if path is not None else [])
    folder = Path(report_dir) if report_dir is not None else None

    def write(name: str, data: bytes) -> Path:
        if folder is None:
            return study.store.write_bytes(f"{REPORT_DIR}/{name}", data)
        atomic_write_bytes(folder / name, data)
        return folder / name

    written: dict[str, Path] = {}
    # Figures first: a reader who opens report.html while it is being replaced finds its images.
    for name, data in composed.images.items():
        written[name] = write(name, data)
    written["report.md"] = write("report.md", render_markdown(composed.document).encode())
    written["report.html"] = write("report.html", render_html(composed.document).encode())
    written.update(write_table_csvs(composed.document, write))
    _remove_stale(folder if folder is not None else study.store.root / REPORT_DIR, written)
    return written


def _remove_stale(folder: Path, written: dict[str, Path]) -> None:
    """Remove what an earlier report of this folder left and this one did not write: its PNG
    figures and tables/*.csv (a figure no longer drawn would otherwise sit beside the new
    report, looking current). Other files in the folder are left alone."""
    keep = {p.resolve() for p in written.values()}
    for old in [*folder.glob("*.png"), *(folder / TABLES_DIR).glob("*.csv")]:
        if old.is_file() and old.resolve() not in keep:
            old.unlink(missing_ok=True)


__all__ = ["write_report", "REPORT_DIR"]
