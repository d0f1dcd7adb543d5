"""Exports: `bnlab runs` and `bnlab study status` as CSV and JSON, and the report's tables as CSV
files beside report.md; checked against the run folders' own files."""

from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path

import pytest
from helpers import run_cli

from bnlab import cli
from bnlab.config import from_mapping
from bnlab.console import records_csv, records_json
from bnlab.report.compose import compose
from bnlab.report.load import load_study
from bnlab.store import Store

SPEC = """
name = "tiny-export"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 96
limit_test = 64
batch_size = 32
epochs = 2
lr = 0.05
device = "cpu"
[grid]
norm = ["bn", "none"]
seed = [0]
"""
NEVER = dict(dataset="synthetic", model="mlp3x100", limit_train=96, limit_test=64,
             batch_size=32, epochs=2, lr=0.05, device="cpu", norm="none", seed=2)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("exports")
    spec = tmp / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    out = tmp / "out"
    assert cli.main(["study", "run", str(spec), "--out", str(out)]) == 0
    # a planned run that never started: listed in study.json, no folder
    store = Store(out)
    meta = store.read_meta("study.json")
    meta["runs"].append({"run_id": from_mapping(NEVER).run_id(),
                         "values": {"norm": "none", "seed": 2, "dataset": "synthetic"}})
    store.write_meta("study.json", meta)
    return out


def _summaries(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/summary.json")}


def test_runs_as_csv_and_json(study, capsys):
    summaries = _summaries(study)
    rc, text, _ = run_cli(capsys, "runs", "--out", study, "--format", "csv")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 3
    for row in rows:
        s = summaries.get(row["run_id"])
        if s is None:
            assert row["status"] == "pending" and row["test_acc"] == "" and row["seed"] == "2"
            continue
        cfg = json.loads((study / row["run_id"] / "config.json").read_text())["config"]
        assert row["status"] == s["status"] and float(row["test_acc"]) == s["test_acc"]
        assert int(row["epochs_done"]) == s["epochs_done"] == 2
        assert row["arm"] == f"norm={cfg['norm']}" and row["seed"] == str(cfg["seed"])
        assert float(row["lr"]) == cfg["lr"] and row["model"] == "mlp3x100"
        assert row["norm_options"] == "{}"  # tables as JSON text
    rc, text, _ = run_cli(capsys, "runs", "--out", study, "--format", "json")
    records = json.loads(text)
    assert [r["run_id"] for r in records] == [r["run_id"] for r in rows]
    for r in records:
        if r["run_id"] in summaries:
            assert r["test_acc"] == summaries[r["run_id"]]["test_acc"]
            assert r["norm_options"] == {}
        else:
            assert r["status"] == "pending" and r["test_acc"] is None


def test_runs_table_stays_the_default(study, capsys):
    rc, text, _ = run_cli(capsys, "runs", "--out", study)
    assert rc == 0 and text.splitlines()[0].split() == [
        "run_id", "status", "dataset", "norm", "seed", "epochs", "test_acc", "wall_s"]


def test_study_status_as_csv_and_json(study, capsys):
    summaries = _summaries(study)
    rc, text, _ = run_cli(capsys, "study", "status", study, "--format", "csv")
    assert rc == 0
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == ["run_id", "norm", "dataset", "status", "epochs_done",
                             "epochs", "test_acc", "train_acc", "wall_time", "error", "attempts"]
    assert [r["status"] for r in rows].count("pending") == 1
    for r in rows:
        if r["run_id"] in summaries:
            assert float(r["train_acc"]) == summaries[r["run_id"]]["train_acc"]
            assert r["attempts"] == "1"
    rc, text, _ = run_cli(capsys, "study", "status", study, "--format", "json")
    assert [r["run_id"] for r in json.loads(text)] == [r["run_id"] for r in rows]


def test_bad_format_is_one_line_exit_2(study, capsys):
    rc, _, err = run_cli(capsys, "runs", "--out", study, "--format", "xlsx")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "'table', 'csv', 'json'" in err


def test_report_tables_as_csv_beside_report_md(study, capsys):
    rc, text, _ = run_cli(capsys, "study", "report", study)
    assert rc == 0 and "tables/summary.csv" in text
    doc = compose(load_study(study)).document
    files = sorted((study / "report" / "tables").glob("*.csv"))
    assert [p.name for p in files] == sorted(f"{t.anchor}.csv" for t in doc.tables)
    md = (study / "report" / "report.md").read_text()
    for t in doc.tables:
        rows = list(csv.reader((study / "report" / "tables" / f"{t.anchor}.csv").open()))
        assert rows[0] == ["#", *t.head] and len(rows) == len(t.rows) + 1
        for i, (got, want) in enumerate(zip(rows[1:], t.rows), 1):
            assert got == [str(i), *want]
        # the same numbers as the Markdown table: its first data row, cell by cell
        line = next(x for x in md.splitlines() if x.startswith(f"| 1 | {t.rows[0][0]}"))
        assert len(line.strip("|").split(" | ")) == len(rows[1])


def test_records_helpers_keep_precision_and_refuse_nan():
    recs = [{"a": 0.1 + 0.2, "b": float("nan"), "c": {"x": 1}}, {"a": None, "d": "z"}]
    rows = list(csv.reader(io.StringIO(records_csv(recs))))
    assert rows == [["a", "b", "c", "d"], ["0.30000000000000004", "", '{"x": 1}', ""],
                    ["", "", "", "z"]]
    assert json.loads(records_json(recs)) == [{"a": 0.30000000000000004, "b": None,
                                               "c": {"x": 1}}, {"a": None, "d": "z"}]
    assert records_csv([]) == ""


def test_export_arm_is_the_reports_arm_label(tmp_path):
    """lr and warm-up set by a case for norm=none follow from norm: the report and
    compare.json leave them out of the label ("norm=none"), and so must the export, or a join
    on `arm` finds nothing. A select_best axis is always named."""
    from bnlab.report.arms import build_arms
    from bnlab.report.records import run_records

    def entry(i, norm, lr, warm, seed, dropout=0.0):
        return {"run_id": f"r{i}", "values": {"norm": norm, "lr": lr, "warmup_epochs": warm,
                                              "dropout": dropout, "seed": seed,
                                              "dataset": "synthetic"}}

    runs = [entry(0, "bn", 0.1, 0.0, 0), entry(1, "bn", 0.1, 0.0, 1),
            entry(2, "none", 0.01, 2.0, 0), entry(3, "none", 0.01, 2.0, 1)]
    Store(tmp_path / "a").write_meta("study.json", {
        "name": "labels", "axes": ["norm", "lr", "warmup_epochs", "seed"], "runs": runs,
        "analysis": {}})
    arms = {r["run_id"]: r["arm"] for r in run_records(tmp_path / "a")}
    assert arms == {"r0": "norm=bn", "r1": "norm=bn", "r2": "norm=none", "r3": "norm=none"}
    report = {r.run_id: a.label for a in build_arms(load_study(tmp_path / "a")) for r in a.runs}
    assert arms == report
    # tuning lr for norm=none, dropout varying for bn: lr is named (select_best), warm-up not
    runs = [entry(0, "bn", 0.1, 0.0, 0), entry(1, "bn", 0.1, 0.0, 0, 0.5),
            entry(2, "none", 0.01, 2.0, 0), entry(3, "none", 0.02, 2.0, 0)]
    Store(tmp_path / "b").write_meta("study.json", {
        "name": "labels", "axes": ["norm", "dropout", "lr", "warmup_epochs", "seed"],
        "runs": runs, "analysis": {"select_best": ["lr"], "select_on": "test"}})
    arms = {r["run_id"]: r["arm"] for r in run_records(tmp_path / "b")}
    assert arms == {"r0": "norm=bn, dropout=0, lr=0.1", "r1": "norm=bn, dropout=0.5, lr=0.1",
                    "r2": "norm=none, dropout=0, lr=0.01", "r3": "norm=none, dropout=0, lr=0.02"}
    report = {r.run_id: a.label for a in build_arms(load_study(tmp_path / "b")) for r in a.runs}
    assert arms == report
