"""The study report end to end, on a tiny study trained for real (synthetic data, mlp3x100).

The fixture trains 8 runs (norm=bn with dropout 0 / 0.5; norm=none with lr 0.5 / 1e6, which
diverges), 2 seeds each, lists a ninth run that was never started, and adds probe rows and a
prediction comparison written in the contract formats. Expected numbers are recomputed here
from the stored files with numpy/scipy, independently of bnlab.report.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as sps

from bnlab.config import from_mapping
from bnlab.data.bundle import Split
from bnlab.data.synthetic import make_synthetic
from bnlab.errors import UserError
from bnlab.report import write_report
from bnlab.report.compose import compose
from bnlab.report.load import load_study
from bnlab.report.provenance import to_toml
from bnlab.store import Store, atomic_write_json
from bnlab.train import train_run

NAME = 'tiny <script>document.body.dataset.pwned = "1"</script> & co'
BASE = dict(dataset="synthetic", model="mlp3x100", epochs=2, batch_size=16, limit_train=256,
            limit_test=200, device="cpu", augment=False)
ARMS = [dict(norm="bn", lr=1.0, dropout=0.0), dict(norm="bn", lr=1.0, dropout=0.5),
        dict(norm="none", lr=0.5, dropout=0.0), dict(norm="none", lr=1e6, dropout=0.0)]
SEEDS = [0, 1]
PROBE_STEPS = [0, 8, 16, 24, 32]


def p50_slope(values: dict) -> float:
    """Fixture probe rows: the median of each layer's input moves by slope * step."""
    return 0.0005 if values["norm"] == "bn" else 0.02 * (1 + values["seed"])


def _probe_rows(values: dict) -> list[dict]:
    """Rows named as bnlab.train.probes names them for mlp3x100: activations at each sigmoid input
    ("hidden.<i>.sigmoid", recorded before the enclosing block's output "hidden.<i>"), weight
    gradients and ICS per linear layer, model-wide values on layer ""."""
    rows = []

    def add(step, layer, metric, v):
        rows.append({"step": step, "epoch": step // 16, "layer": layer, "metric": metric,
                     "value": v})

    for step in PROBE_STEPS:
        for i in range(3):
            p50 = 0.1 * i + p50_slope(values) * step
            for metric, v in (("act_p15", p50 - 0.5), ("act_p50", p50), ("act_p85", p50 + 0.5)):
                add(step, f"hidden.{i}.sigmoid", metric, v)
                add(step, f"hidden.{i}", metric, 0.5)  # the block output: a sigmoid's output
            add(step, f"hidden.{i}.linear", "grad_norm", (i + 1) / (1 + step))
            add(step, f"hidden.{i}.linear", "ics_l2", 0.1 * (i + 1))
            add(step, f"hidden.{i}.linear", "ics_cos", 1.0 - 0.01 * step)
        add(step, "", "loss_variation", 0.01 * step + values["seed"])
        add(step, "", "grad_norm", 1.0 / (1 + step))
    return rows


def _png() -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1.5))
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "out"
    # Noisier than the default synthetic set, so that seeds differ in accuracy.
    bundle = make_synthetic(BASE["limit_train"], BASE["limit_test"], noise=250.0)
    store = Store(out)
    entries = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention
    try:
        for arm in ARMS:
            for seed in SEEDS:
                values = dict(arm, seed=seed)
                cfg = from_mapping({**BASE, **values})
                train_run(cfg, out, bundle=bundle, log=lambda m: None)
                entries.append({"run_id": cfg.run_id(),
                                "values": dict(values, dataset="synthetic")})
                if arm["dropout"] == 0.0 and arm["lr"] < 10:
                    store.run(cfg.run_id()).write_rows("probes.jsonl", _probe_rows(values))
        # A run that crashes (labels outside the model's classes) is recorded as failed.
        broken = dataclasses.replace(bundle, train=Split(bundle.train.x, bundle.train.y + 10))
        crash = dict(ARMS[0], seed=2)
        cfg = from_mapping({**BASE, **crash})
        with pytest.raises(IndexError):
            train_run(cfg, out, bundle=broken, log=lambda m: None)
        entries.append({"run_id": cfg.run_id(), "values": dict(crash, dataset="synthetic")})
    finally:
        torch.set_num_threads(threads)
    never = dict(ARMS[2], seed=2)
    entries.append({"run_id": from_mapping({**BASE, **never}).run_id(),
                    "values": dict(never, dataset="synthetic")})
    spec = {"name": NAME, "description": "BN vs none <i>tiny</i>", "base": BASE,
            "grid": {"norm": ["bn", "none"], "seed": SEEDS},
            "cases": [{"where": {"norm": "bn"}, "grid": {"dropout": [0.0, 0.5]}},
                      {"where": {"norm": "none"}, "grid": {"lr": [0.5, 1e6]}}],
            "analysis": {"select_best": ["lr"], "baseline": {"norm": "bn"}}}
    store.write_meta("study.json", {
        "name": NAME, "description": spec["description"], "spec": spec,
        "sets": {"epochs": 2}, "only": {}, "data_map": {},
        "axes": ["norm", "dropout", "lr", "seed"], "runs": entries,
        "analysis": spec["analysis"]})
    bn0, none0 = entries[0]["run_id"], entries[4]["run_id"]
    store.write_bytes("analysis/reliability.png", _png())
    store.write_bytes("evil.png", _png())
    atomic_write_json(out / "analysis" / "compare.json", {
        "models": [{"run_id": bn0, "label": "norm=bn <b>", "test_acc": 0.9, "nll": 0.31,
                    "brier": 0.14, "ece": 0.021, "per_class_acc": [0.9] * 10,
                    "corruption_acc": {"gaussian_noise": [0.8, 0.7, 0.6, 0.5, 0.4]}},
                   {"run_id": none0, "label": "norm=none", "test_acc": 0.3, "nll": 1.9,
                    "brier": 0.8, "ece": 0.12, "per_class_acc": [0.3] * 10,
                    "corruption_acc": {"gaussian_noise": [0.3, 0.2, 0.2, 0.1, 0.1]}}],
        "pairs": [{"a": bn0, "b": none0, "agreement": 0.31, "right_to_wrong": 120,
                   "wrong_to_right": 8, "both_right": 52, "both_wrong": 20, "kl_ab": 1.2,
                   "kl_ba": 0.9, "js": 0.2}],
        "figures": ["reliability.png", "missing.png", "../evil.png"]})
    return out


@pytest.fixture(scope="session")
def written(study_dir) -> dict[str, Path]:
    return write_report(study_dir)


@pytest.fixture(scope="session")
def doc(study_dir):
    return compose(load_study(study_dir)).document


def _stored(study_dir: Path) -> dict[tuple, list[dict]]:
    """Summaries per arm, read straight from the run folders."""
    meta = json.loads((study_dir / "study.json").read_text())
    out: dict[tuple, list[dict]] = {}
    for e in meta["runs"]:
        v = e["values"]
        p = study_dir / e["run_id"] / "summary.json"
        s = json.loads(p.read_text()) if p.is_file() else {"status": "missing"}
        out.setdefault((v["norm"], v["dropout"], v["lr"]), []).append(s)
    return out


def _accs(summaries):
    return [s["test_acc"] for s in summaries if s["status"] in ("completed", "no_learning")]


def test_report_files_written(written, study_dir):
    assert set(written) >= {"report.html", "report.md", "curves-synthetic.png",
                            "gap-synthetic.png", "percentiles-synthetic.png",
                            "gradnorm-synthetic.png", "ics-synthetic.png",
                            "compare-reliability.png"}
    for name, path in written.items():
        assert path == study_dir / "report" / name and path.is_file()
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (study_dir / "report" / "compare-evil.png").exists()
    assert not (study_dir / "report" / "compare-missing.png").exists()


@pytest.mark.filterwarnings("ignore:Precision loss")  # scipy, when an arm has equal values
def test_summary_table_matches_stored_runs(study_dir, doc):
    stored = _stored(study_dir)
    table = doc.tables[0]
    assert table.anchor == "summary"
    by_arm = {row[1]: row for row in table.rows}
    # the diverging lr is not selected: both of its runs diverged
    assert all(s["status"] == "diverged" for s in stored[("none", 0.0, 1e6)])
    assert set(by_arm) == {"norm=bn, dropout=0, lr=1", "norm=bn, dropout=0.5, lr=1",
                           "norm=none, dropout=0, lr=0.5 †"}
    base = _accs(stored[("bn", 0.0, 1.0)])
    for key in [("bn", 0.0, 1.0), ("bn", 0.5, 1.0), ("none", 0.0, 0.5)]:
        accs = _accs(stored[key])
        row = next(r for r in table.rows
                   if f"norm={key[0]}" in r[1] and f"dropout={key[1]:g}," in r[1]
                   and f"lr={key[2]:g}" in r[1])
        assert row[2] == str(len(accs))
        assert row[3] == f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}"
        half = sps.t.ppf(0.975, len(accs) - 1) * np.std(accs, ddof=1) / np.sqrt(len(accs))
        lo, hi = np.mean(accs) - half, np.mean(accs) + half
        mark = "‡" if lo < 0 or hi > 1 else ""  # cut at the possible range of an accuracy
        lo, hi = max(lo, 0.0), min(hi, 1.0)
        assert row[4] == f"[{100 * lo:.2f}, {100 * hi:.2f}]{mark}"
        statuses = [s["status"] for s in stored[key]]
        assert row[7:11] == [str(statuses.count(s)) for s in
                             ("completed", "no_learning", "diverged", "failed")]
        if key[0] == "bn":
            assert row[5] == "baseline"
        else:
            assert row[5].split(" [")[0] == f"{100 * (np.mean(accs) - np.mean(base)):+.2f}"
            ref = sps.ttest_ind(accs, base, equal_var=False)
            ci = ref.confidence_interval(0.95)
            assert row[5].endswith(f"[{100 * ci.low:+.2f}, {100 * ci.high:+.2f}]")
            if np.isfinite(ref.pvalue):
                p = ref.pvalue
                text = f"{p:.4f}" if round(p, 3) == 0.05 else f"{p:.3f}"
                assert row[6] == ("< 0.001" if p < 0.001 else text)
            else:
                assert row[6].startswith("–")
    never = next(r for r in table.rows if "norm=none" in r[1])
    assert never[11] == "1"  # the run that was never started is pending, not hidden
    crashed = next(r for r in table.rows if r[1] == "norm=bn, dropout=0, lr=1")
    assert crashed[10] == "1" and crashed[2] == "2"  # failed: counted, not averaged


def test_selection_table_marks_best_stable_lr(study_dir, doc):
    stored = _stored(study_dir)
    sel = doc.tables[1]
    assert sel.anchor == "selection"
    lrs = [row[2] for row in sel.rows]
    assert lrs == ["0.5", "1e+06"]
    chosen = [row[2] for row, m in zip(sel.rows, sel.marked) if m]
    assert chosen == ["0.5"]
    assert sel.rows[1][6] == str(sum(s["status"] == "diverged"
                                     for s in stored[("none", 0.0, 1e6)]))
    assert any("biased upward" in n for n in sel.notes)


def test_a_tuned_value_at_the_edge_of_its_grid_is_flagged(study_dir, doc, written):
    """lr 0.5 is selected from {0.5, 1e6}: the lowest value tried, so the arm may be
    under-tuned and the report says to extend the grid downward, in the selection table, the
    findings and both rendered formats."""
    sel = doc.tables[1]
    chosen = [row for row, m in zip(sel.rows, sel.marked) if m]
    assert chosen[0][-1] == "selected (at the grid's edge)"
    items = next(b for b in doc.blocks if type(b).__name__ == "Bullets").items
    flagged = [s for s in items if "possibly under-tuned" in s]
    assert len(flagged) == 1 and "lr = 0.5 is the lowest value tried (0.5 to 1e+06)" in \
        flagged[0] and "extend the grid downward" in flagged[0]
    assert "possibly under-tuned" in written["report.md"].read_text()
    assert "possibly under-tuned" in written["report.html"].read_text()


def test_gap_and_probe_tables(study_dir, doc):
    stored = _stored(study_dir)
    gap = next(t for t in doc.tables if t.anchor == "gap")
    row = next(r for r in gap.rows if "dropout=0.5" in r[1])
    gaps = [s["train_acc"] - s["test_acc"] for s in stored[("bn", 0.5, 1.0)]
            if s["status"] in ("completed", "no_learning")]
    assert row[5] == f"{100 * np.mean(gaps):.2f} ± {100 * np.std(gaps, ddof=1):.2f}"
    probe = next(t for t in doc.tables if t.anchor == "probes")
    assert [r[2] for r in probe.rows] == ["hidden.2.sigmoid"] * 2
    # drift: mean of the last k probes minus mean of the first k, k = 1 for 5 probes (a
    # quarter of them at most), so the planted line moves by its slope times the span
    span = PROBE_STEPS[-1] - PROBE_STEPS[0]
    for r in probe.rows:
        norm = "bn" if "norm=bn" in r[1] else "none"
        moves = [p50_slope({"norm": norm, "seed": s}) * span for s in SEEDS]
        assert r[3] == "2" and r[4] == "0–32"
        assert r[8] == f"{np.mean(moves):+.3f} ± {np.std(moves, ddof=1):.3f}"


def test_findings_cite_existing_rows_and_follow_numbers(study_dir, doc):
    items = next(b for b in doc.blocks if type(b).__name__ == "Bullets").items
    tables = {t.label: t for t in doc.tables}
    assert len(items) >= 5
    for sentence in items:
        cites = re.findall(r"\((Table \d+)(?:, rows? ([\d, and]+))?\)", sentence)
        assert cites, sentence
        for label, rows in cites:
            assert label in tables
            for r in re.findall(r"\d+", rows):
                assert 1 <= int(r) <= len(tables[label].rows)
    summary = doc.tables[0]
    none_row = next(r for r in summary.rows if "norm=none" in r[1])
    diff = float(none_row[5].split(" [")[0])
    cmp = next(s for s in items if "than the baseline" in s or "same mean" in s
               or "no Welch test" in s)
    if "than the baseline" in cmp:
        assert ("is higher" in cmp) == (diff > 0) and ("is lower" in cmp) == (diff < 0)
    assert any("lr=0.5 gave the highest mean" in s and "biased upward" in s for s in items)
    assert any(s.startswith("Of the 2 runs of norm=none, dropout=0, lr=1e+06 on synthetic, "
                            "2 diverged") for s in items)


def test_every_user_string_is_escaped(written):
    html = written["report.html"].read_text()
    assert "<script" not in html.lower()
    assert "&lt;script&gt;document.body.dataset.pwned" in html
    assert "norm=bn <b>" not in html and "norm=bn &lt;b&gt;" in html  # compare.json label
    assert "<i>tiny</i>" not in html and "&lt;i&gt;tiny&lt;/i&gt;" in html
    assert "&amp; co" in html
    md = written["report.md"].read_text()
    # Inside a fenced code block text is literal in every Markdown renderer; outside, escaped.
    fenced = re.findall(r"(`{3,})toml\n(.*?)\n\1", md, flags=re.S)
    assert any("<script>" in body for _, body in fenced)
    md = re.sub(r"(`{3,})toml\n.*?\n\1", "", md, flags=re.S)
    assert "<script" not in md and "norm=bn <b>" not in md and "<i>" not in md
    assert "&lt;script&gt;" in md


def test_markdown_has_the_same_content(written, study_dir, doc):
    md = written["report.md"].read_text()
    html = written["report.html"].read_text()
    for t in doc.tables:
        assert f"**{t.label}.**" in md and f"<b>{t.label}.</b>" in html
        assert md.count("\n| ") >= len(t.rows)
    for f in doc.figures:
        assert f"]({f.file})" in md and f'src="{f.file}"' in html
    assert len(re.findall(r'<tr data-row="', html)) == sum(len(t.rows) for t in doc.tables)


def test_configs_versions_and_hardware(written):
    html = written["report.html"].read_text()
    assert "Run configuration shared by all runs" in html
    assert "mlp3x100" in html and "limit_train" in html
    assert "--set epochs" in html
    import torch

    assert torch.__version__ in html
    assert "Configuration keys that vary between runs" in html
    # every run of the fixture trained in one process: the whole batch is the norm batch
    assert "1 x 16 = 16 images, normalization batch 16" in html


def test_spec_is_shown_as_toml_that_reads_back_the_same(study_dir):
    spec = json.loads((study_dir / "study.json").read_text())["spec"]
    spec = dict(spec, odd={"key with space": 'quote " and \\ backslash', "inline": {"a": 1}},
                floats=[0.1, 1e-07, 3.0], flag=True)
    assert tomllib.loads(to_toml(spec)) == spec


@pytest.mark.parametrize("elsewhere", [False, True])
def test_report_removes_figures_and_tables_an_earlier_report_left(tmp_path, elsewhere):
    out = tmp_path / "out"
    values = [dict(norm=n, seed=0) for n in ("bn", "none")]
    Store(out).write_meta("study.json", {
        "name": "empty", "axes": ["norm"], "analysis": {},
        "runs": [{"run_id": from_mapping({**BASE, **v}).run_id(), "values": v} for v in values]})
    folder = tmp_path / "elsewhere" if elsewhere else out / "report"
    (folder / "tables").mkdir(parents=True)
    stale = [folder / "curves-cifar10.png", folder / "tables" / "old-table.csv"]
    kept = [folder / "notes.txt", folder / "tables" / "notes.txt"]
    for p in stale + kept:
        p.write_bytes(b"earlier")
    files = write_report(out, folder if elsewhere else None)
    assert [p.exists() for p in stale] == [False, False]
    assert [p.read_bytes() for p in kept] == [b"earlier", b"earlier"]
    assert all(p.is_file() for p in files.values())
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    assert on_disk == set(files) | {"notes.txt", "tables/notes.txt"}


def test_report_of_a_study_with_no_finished_run(tmp_path):
    out = tmp_path / "out"
    values = [dict(norm=n, seed=0) for n in ("bn", "none")]
    Store(out).write_meta("study.json", {
        "name": "empty", "axes": ["norm"], "analysis": {},
        "runs": [{"run_id": from_mapping({**BASE, **v}).run_id(), "values": v} for v in values]})
    files = write_report(out)
    doc = compose(load_study(out)).document
    assert set(files) == {"report.html", "report.md", *(f"tables/{t.anchor}.csv"
                                                        for t in doc.tables)}
    assert [r[2] for r in doc.tables[0].rows] == ["0", "0"]
    assert [r[-1] for r in doc.tables[0].rows] == ["1", "1"]  # pending
    items = next(b for b in doc.blocks if type(b).__name__ == "Bullets").items
    assert items == ["The study has 2 runs: 2 not started (Table 2).",
                     "On unknown, norm=none cannot be compared with the baseline norm=bn yet: "
                     "norm=none is pending (0 of 1 run finished); norm=bn is pending (0 of 1 run "
                     "finished) (Table 1, rows 2 and 1)."]


def test_store_files_of_the_output_root(tmp_path):
    store = Store(tmp_path / "out")
    assert store.read_meta("study.json") is None
    store.write_meta("study.json", {"a": float("nan"), "b": [1, 2]})
    assert store.read_meta("study.json") == {"a": "nan", "b": [1, 2]}
    path = store.write_bytes("report/f.png", b"\x89PNG")
    assert path == tmp_path / "out" / "report" / "f.png"
    assert path.read_bytes() == b"\x89PNG"
    assert not list(path.parent.glob(".*.tmp"))
    for bad in ("../f.png", "/tmp/f.png", "report/../../f.png"):
        with pytest.raises(ValueError, match="inside the output root"):
            store.write_bytes(bad, b"")


def test_not_a_study_folder(tmp_path):
    with pytest.raises(UserError, match="no study.json"):
        write_report(tmp_path)


# -- the page in a real browser -----------------------------------------------------------------
CHECK_SCRIPT = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.length > 0 && imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute("data-images", imgs.length + ":" + (ok ? "ok" : "broken"));
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(page: Path, profile: Path, *extra: str) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
           *extra, page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (CI installs it: "
                    "apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(written, study_dir, tmp_path, doc):
    page = written["report.html"]
    check = page.with_name("render-check.html")
    check.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    try:
        dom = run_chromium(check, tmp_path / "profile", "--dump-dom")
    finally:
        check.unlink()
    assert f'data-images="{len(doc.figures)}:ok"' in dom
    assert "data-pwned" not in dom
    summary = dom[dom.index('id="summary"'):]
    summary = summary[:summary.index("</table>")]
    assert summary.count('<tr data-row="') == len(doc.tables[0].rows)
    for row in doc.tables[0].rows:
        assert f">{row[3]}<" in summary


def test_every_stored_comparison_is_reported(study_dir, tmp_path):
    """A study over several datasets stores its second comparison in analysis/<dataset>/; the
    report shows each one, named by its dataset, with its own figures and findings."""
    out = tmp_path / "out"
    shutil.copytree(study_dir, out)
    first = json.loads((out / "analysis" / "compare.json").read_text())
    a, b = (m["run_id"] for m in first["models"])
    Store(out).write_bytes("analysis/mnist/reliability.png", _png())
    atomic_write_json(out / "analysis" / "mnist" / "compare.json", {
        "models": [{"run_id": a, "label": "bn on mnist", "test_acc": 0.97, "nll": 0.1,
                    "brier": 0.05, "ece": 0.004},
                   {"run_id": b, "label": "none on mnist", "test_acc": 0.95, "nll": 0.2,
                    "brier": 0.08, "ece": 0.009}],
        "pairs": [{"a": a, "b": b, "agreement": 0.9612, "right_to_wrong": 30,
                   "wrong_to_right": 11, "both_right": 940, "both_wrong": 19}],
        "figures": ["reliability.png"]})
    study = load_study(out)
    assert [(c.folder, c.dataset) for c in study.comparisons] == [
        ("analysis", "synthetic"), ("analysis/mnist", "mnist")]
    doc = compose(study).document
    mnist = [t for t in doc.tables if t.title.endswith("(mnist)")]
    assert [t.anchor for t in mnist] == ["compare2-models", "compare2-pairs"]
    assert mnist[0].rows[0][:3] == ["bn on mnist", "1", "97.00"]  # one run: n = 1
    assert any(t.title.endswith("(synthetic)") for t in doc.tables)
    items = next(x for x in doc.blocks if type(x).__name__ == "Bullets").items
    pair = next(s for s in items if s.startswith("On mnist, bn on mnist and none on mnist"))
    assert "96.12%" in pair and f"({mnist[1].label}, row 1)" in pair
    assert any(s.startswith("On mnist, among the compared arms, bn on mnist has the lowest")
               for s in items)
    files = write_report(out)
    assert {"compare-reliability.png", "compare-mnist-reliability.png"} <= set(files)
    assert "From analysis/mnist/reliability.png" in files["report.md"].read_text()


def test_published_references_sit_beside_the_measured_arms(study_dir, tmp_path):
    """A reference file adds a Published column to the summary with each source cited; an
    entry that matches no arm is named in the notes; a broken file is one line naming it."""
    from bnlab.report.compose import compose
    from bnlab.report.references import builtin_path, load_references

    ref = tmp_path / "refs.toml"
    ref.write_text('[[reference]]\nwhere = { norm = "bn", dropout = 0.5 }\nmetric = "test_acc"\n'
                   'value = 0.9125\nsource = "A paper"\nlocation = "Table 6"\n'
                   'setting = "lossless data"\n\n'
                   '[[reference]]\nwhere = { norm = "group" }\nmetric = "test_acc"\n'
                   'value = 0.5\nsource = "Another"\nlocation = "Fig. 1"\n')
    table = compose(load_study(study_dir), load_references(ref)).document.tables[0]
    assert table.head[-1] == "Published (%)"
    cells = {row[1]: row[-1] for row in table.rows}
    assert cells["norm=bn, dropout=0.5, lr=1"] == "91.25 [1]"
    assert cells["norm=bn, dropout=0, lr=1"] == "–"
    assert "[1] A paper, Table 6 (lossless data)." in table.notes
    assert any("matched no arm" in n and "Another, Fig. 1" in n for n in table.notes)
    assert compose(load_study(study_dir)).document.tables[0].head[-1] != "Published (%)"
    for text, words in (("[[reference]]\nwhere = {norm = 'bn'}\n", "lacks 'metric'"),
                        ("x = 1\n", r"must hold \[\[reference\]\] tables only"),
                        ("[[reference]]\nwhere = {norm = 'bn'}\nmetric = 'test_acc'\n"
                         "value = 91.25\nsource = 's'\nlocation = 'l'\n", "a fraction")):
        ref.write_text(text)
        with pytest.raises(UserError, match=words):
            load_references(ref)
    for name in ("seed", "imagenet"):  # the shipped files load
        assert load_references(builtin_path(name))
