"""The Python API: the notebook example run for real (synthetic data), its DataFrames checked
against the run folders' files, the same one-line errors as the command line, and `import
bnlab` staying light."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import bnlab
from bnlab import cli
from bnlab.store import Store
from bnlab.study.spec import expand, load_spec, parse_data_map

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "notebook_study.py"
SMALL = dict(dataset="synthetic", model="mlp3x100", limit_train=64, limit_test=32,
             batch_size=16, device="cpu", lr=0.05)


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """examples/notebook_study.py run as a user runs it: its output folder and stdout."""
    tmp = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(tmp / "out")], cwd=tmp, env=env(),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "out", proc.stdout


def _study_json(out: Path) -> dict:
    return json.loads((out / "study.json").read_text())


def _summaries(out: Path) -> dict[str, dict]:
    return {r["run_id"]: json.loads((out / r["run_id"] / "summary.json").read_text())
            for r in _study_json(out)["runs"]}


# -- the acceptance example --------------------------------------------------------------------
def test_example_runs_a_study_and_draws_its_own_plot(demo):
    out, stdout = demo
    png = out / "test_acc_by_arm.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000
    summaries = _summaries(out)
    counts: dict[str, int] = {}
    for s in summaries.values():
        counts[s["status"]] = counts.get(s["status"], 0) + 1
    line = next(x for x in stdout.splitlines() if x.startswith("statuses: "))
    assert ast.literal_eval(line.removeprefix("statuses: ")) == counts
    # the post-study analysis ran as on the command line: one prediction comparison
    compared = json.loads((out / "analysis" / "compare.json").read_text())
    assert [a["label"] for a in compared["arms"]] == ["norm=bn", "norm=none"]
    assert (out / "report" / "report.html").is_file()
    assert (out / "report" / "tables" / "summary.csv").is_file()


# -- DataFrames against the stored files -------------------------------------------------------
def test_load_runs_one_row_per_run_with_config_and_results(demo):
    out, _ = demo
    df = bnlab.load_runs(out)
    doc = _study_json(out)
    assert list(df.run_id) == [r["run_id"] for r in doc["runs"]]
    assert list(df.columns[:4]) == ["run_id", "arm", "dataset", "seed"]
    for row in df.itertuples():
        summary = json.loads((out / row.run_id / "summary.json").read_text())
        config = json.loads((out / row.run_id / "config.json").read_text())["config"]
        assert row.status == summary["status"] and row.test_acc == summary["test_acc"]
        assert row.wall_time == summary["wall_time"] and row.epochs_done == 3
        assert row.arm == f"norm={config['norm']}" and row.seed == config["seed"]
        assert row.lr == config["lr"] and row.probe_every == config["probe_every"] == 8
        assert set(summary) - {"run_id"} <= set(df.columns)  # every stored result exported
    # the same rows as `bnlab runs --format json`
    assert bnlab.load_runs(out).equals(bnlab.load_runs(bnlab.Study.from_folder(out)))


def test_load_metrics_long_format_equals_metrics_jsonl(demo):
    out, _ = demo
    long = bnlab.load_metrics(out)
    assert {"run_id", "arm", "seed", "epoch", "step", "metric", "value"} <= set(long.columns)
    for run_id in _summaries(out):
        rows = [json.loads(x) for x in (out / run_id / "metrics.jsonl").read_text().splitlines()]
        mine = long[long.run_id == run_id]
        wide = mine.pivot(index="epoch", columns="metric", values="value")
        assert list(wide.index) == [r["epoch"] for r in rows]
        for r in rows:
            for k, v in r.items():
                if k not in ("epoch", "step"):
                    assert wide.loc[r["epoch"], k] == v
        assert len(mine) == sum(len(r) - 2 for r in rows)


def test_load_probes_equals_probes_jsonl(demo):
    out, _ = demo
    probes = bnlab.load_probes(out)
    total = 0
    for run_id in _summaries(out):
        rows = [json.loads(x) for x in (out / run_id / "probes.jsonl").read_text().splitlines()]
        mine = probes[probes.run_id == run_id]
        assert list(mine.value) == [r["value"] for r in rows]
        assert list(mine.layer) == [r["layer"] for r in rows]
        assert str(mine.unit.dtype) == "Int64"  # whole numbers; pooled rows have none
        units = [None if pd.isna(u) else int(u) for u in mine.unit]
        assert units == [r.get("unit") for r in rows]
        total += len(rows)
    assert len(probes) == total > 0
    assert probes.unit.notna().any() and probes.unit.isna().any()  # per-unit and pooled rows
    assert set(probes.columns) >= {"arm", "seed", "step", "epoch", "layer", "metric", "unit",
                                   "value"}


def test_study_resumes_and_reports_like_the_command(demo, capsys):
    out, _ = demo
    attempts = Store(out).attempts()
    before = {p: p.read_bytes() for p in out.glob("*/metrics.jsonl")}
    study = bnlab.Study.from_folder(out)
    assert study.name == "notebook-demo" and len(study.runs) == 4
    counts = study.run()
    capsys.readouterr()
    assert sum(counts.values()) == 4 and "pending" not in counts
    assert Store(out).attempts() == attempts  # nothing was trained again
    assert before == {p: p.read_bytes() for p in before}
    status = study.status()
    assert cli.main(["study", "status", str(out), "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert status.where(status.notna(), None).to_dict("records") == records
    written = study.report()
    assert set(written) == set(bnlab.write_report(out))
    assert all(p.is_file() for p in written.values())


def test_study_refuses_a_folder_of_another_study(demo, tmp_path):
    out, _ = demo
    other = bnlab.Study.from_spec({"name": "other", "base": SMALL, "grid": {"seed": [0]}})
    with pytest.raises(bnlab.UserError, match="holds the results of study 'notebook-demo'"):
        other.run(out=out)


# -- specs from Python -------------------------------------------------------------------------
def test_spec_from_name_path_or_dict_with_overrides(tmp_path):
    quick = bnlab.Study.from_spec("quick")
    listed = bnlab.list_studies().set_index("study")
    assert listed.loc["quick", "runs"] == len(quick.plan.runs) == \
        len(expand(load_spec("quick")).runs)
    toml = tmp_path / "s.toml"
    toml.write_text('name = "s"\n[base]\ndataset = "synthetic"\nmodel = "mlp3x100"\n'
                    '[grid]\nnorm = ["bn", "none"]\nseed = [0, 1]\n')
    from_file = bnlab.Study.from_spec(toml, set={"epochs": 1}, only={"norm": ["bn"]})
    from_dict = bnlab.Study.from_spec(
        {"name": "s", "base": {"dataset": "synthetic", "model": "mlp3x100"},
         "grid": {"norm": ["bn", "none"], "seed": [0, 1]}},
        set=["epochs=1"], only="norm=bn")
    ref = expand(load_spec(str(toml)), [("epochs", 1)], [("norm", "bn")])
    assert list(from_file.runs.run_id) == list(from_dict.runs.run_id) == \
        [r.run_id for r in ref.runs]
    assert all(r.cfg.epochs == 1 and r.cfg.norm == "bn" for r in from_dict.plan.runs)
    mapped = bnlab.Study.from_spec("quick", data_map={"cifar10": "imagefolder:rel/cifar"},
                                   device="cpu", tensorboard=True)
    assert mapped.plan.data_map == parse_data_map(["cifar10=imagefolder:rel/cifar"])
    assert all(r.cfg.device == "cpu" and r.cfg.tensorboard for r in mapped.plan.runs)


def _cli_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0].removeprefix("bnlab: error: ")


@pytest.mark.parametrize("call,argv", [
    (lambda o: bnlab.train_run(lr=-1, out=o), ["train", "--lr", "-1"]),
    (lambda o: bnlab.train_run(epochs="two", out=o), ["train", "--epochs", "two"]),
    (lambda o: bnlab.train_run(schedule="cosin", out=o), ["train", "--schedule", "cosin"]),
    (lambda o: bnlab.Study.from_spec("quik"), ["study", "run", "quik"]),
    (lambda o: bnlab.Study.from_spec("quick", set={"lrr": 1}),
     ["study", "run", "quick", "--set", "lrr=1"]),
    (lambda o: bnlab.Study.from_spec("quick", set=["lr=abc"]),
     ["study", "run", "quick", "--set", "lr=abc"]),
    (lambda o: bnlab.Study.from_spec("quick", only={"norm": "gn"}),
     ["study", "run", "quick", "--only", "norm=gn"]),
    (lambda o: bnlab.Study.from_spec("quick", data_map={"cifar11": "mnist"}),
     ["study", "run", "quick", "--data-map", "cifar11=mnist"]),
    (lambda o: bnlab.load_runs(o), ["runs", "--out", "{o}"]),
    (lambda o: bnlab.write_report(o), ["study", "report", "{o}"]),
    (lambda o: bnlab.bench_speed(variants=["turbo"]), ["bench", "--variants", "turbo"]),
    (lambda o: bnlab.bench_speed(steps=0), ["bench", "--steps", "0"]),
])
def test_errors_are_the_command_lines_one_line_errors(call, argv, tmp_path, capsys):
    folder = tmp_path / "nothing"
    folder.mkdir()
    with pytest.raises(bnlab.UserError) as e:
        call(folder)
    cli_argv = [a.replace("{o}", str(folder)) for a in argv]
    if cli_argv[0] == "train":
        cli_argv += ["--out", str(folder)]
    assert str(e.value) == _cli_error(capsys, cli_argv)
    assert "\n" not in str(e.value)


# -- one run and the inference tools -----------------------------------------------------------
def test_train_run_returns_a_run_with_its_frames(tmp_path):
    run = bnlab.train_run("synthetic", "mlp3x100", "bn", 2, out=tmp_path, probe_every=4,
                          log=lambda m: None, **{k: v for k, v in SMALL.items()
                                                 if k not in ("dataset", "model")})
    stored = json.loads((run.path / "summary.json").read_text())
    assert run.summary == stored and run.status == stored["status"]
    assert run.path == tmp_path / run.run_id and run.config["probe_every"] == 4
    metrics = run.metrics()
    rows = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert metrics.to_dict("records") == rows
    probes = run.probes()
    assert len(probes) == len((run.path / "probes.jsonl").read_text().splitlines()) > 0
    assert bnlab.Run.open(run.path) == run
    # training it again is refused as `bnlab train` refuses it; resume returns it as it is
    with pytest.raises(bnlab.UserError, match="already exists"):
        bnlab.train_run("synthetic", "mlp3x100", "bn", 2, out=tmp_path, probe_every=4,
                        **{k: v for k, v in SMALL.items() if k not in ("dataset", "model")})
    again = bnlab.train_run("synthetic", "mlp3x100", "bn", 2, out=tmp_path, probe_every=4,
                            resume=True, **{k: v for k, v in SMALL.items()
                                            if k not in ("dataset", "model")})
    assert again.summary == run.summary


def test_compare_diagnose_fold_on_the_studys_runs(demo, tmp_path):
    out, _ = demo
    doc = _study_json(out)
    seed0 = [out / r["run_id"] for r in doc["runs"] if r["values"]["seed"] == 0]
    res = bnlab.compare(seed0, out=tmp_path / "cmp", labels=["bn", "none"], corruptions=False)
    assert [r["run_id"] for r in res["runs"]] == [p.name for p in seed0]
    assert (tmp_path / "cmp" / "compare.json").is_file()
    summary = json.loads((seed0[0] / "summary.json").read_text())
    assert abs(res["runs"][0]["test_acc"] - summary["test_acc"]) <= 1 / 128
    diag = bnlab.diagnose(seed0[0], batch_sizes=[2, 8], precise_batches=1, max_images=64)
    assert diag == json.loads((seed0[0] / "diagnose.json").read_text())
    with pytest.raises(bnlab.UserError, match="batch_sizes must be positive integers"):
        bnlab.diagnose(seed0[0], batch_sizes=[0])
    folding = bnlab.fold(seed0[0], repeats=1)
    assert folding.ok is True and folding.failure is None
    assert json.loads((seed0[0] / "fold.json").read_text())["parity"]["ok"] is True


@pytest.mark.slow
def test_bench_speed_measures_a_variant():
    rows = bnlab.bench_speed(variants=["eager"], device="cpu", steps=2, batch_size=16,
                             log=lambda line: None)
    assert list(rows.variant) == ["eager"] and (rows.images_per_s > 0).all()


# -- the package -------------------------------------------------------------------------------
def test_import_bnlab_is_light_and_keeps_its_sub_packages():
    code = ("import sys, bnlab, bnlab.errors\n"
            "assert 'torch' not in sys.modules and 'pandas' not in sys.modules\n"
            "assert bnlab.UserError is bnlab.errors.UserError and 'torch' not in sys.modules\n"
            "f = bnlab.train_run\n"
            "import bnlab.train, bnlab.api\n"
            "assert bnlab.train.__name__ == 'bnlab.train' and f is bnlab.api.train_run\n"
            "assert {'train_run', 'Study', 'load_runs'} <= set(dir(bnlab))\n"
            "from bnlab import cli\n"
            "try:\n    bnlab.nothing\nexcept AttributeError:\n    pass\n"
            "else:\n    raise SystemExit('bnlab.nothing exists')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_frames_need_pandas_only_when_asked(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if pandas were not installed
    with pytest.raises(bnlab.UserError, match=r"pip install 'bnlab\[pandas\]'"):
        bnlab.load_runs(Store(tmp_path).root)
    assert isinstance(pd.DataFrame(), pd.DataFrame)


def test_compare_of_no_runs_is_a_user_error():
    with pytest.raises(bnlab.UserError, match="at least one run folder"):
        bnlab.compare([])
