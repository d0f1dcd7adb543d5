"""precision "auto": fp32 or bf16 chosen per machine from a measured ResNet-20 step
(bnlab.study.calibrate.choose_precision), once, before a run's id is made; a study keeps its
choice in study.json; a run never trains in "auto"."""

from __future__ import annotations

import json
import textwrap

import pytest
from helpers import one_line_error, run_cli

from bnlab import api, machine
from bnlab.config import RunConfig
from bnlab.errors import UserError
from bnlab.study import calibrate
from bnlab.train import train_run

TINY = """
name = "tiny"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 64
limit_test = 32
batch_size = 32
epochs = 1
device = "cpu"
precision = "auto"
[grid]
norm = ["bn", "none"]
seed = [0, 1]
"""


@pytest.fixture
def rates(tmp_path, monkeypatch):
    """An empty cache on an idle machine, and the training rate `measure` reports for each
    precision (set the dict to change it); the calls are counted."""
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(machine, "quiet_for_measuring", lambda: True)
    r = {"fp32": 300.0, "bf16": 500.0, "calls": []}
    monkeypatch.setattr(calibrate, "measure",
                        lambda p, b, t, slower=None: r["calls"].append((p, b, t)) or
                        r.setdefault("slower_than", {}).update({p: slower}) or r[p])
    return r


def test_bf16_only_where_it_is_faster_by_the_margin(rates):
    chosen, why = calibrate.choose_precision("cpu", 64, 1)
    assert chosen == "bf16" and "500 images/s in bf16 and 300 in fp32" in why
    # fp32 measured in full, bf16 only as far as it takes to tell it from the margin
    assert rates["slower_than"] == {"fp32": None, "bf16": pytest.approx(330.0)}
    assert sorted(rates["calls"]) == [("bf16", 64, 1), ("fp32", 64, 1)]
    assert calibrate.cached_precision(64, 1) == "bf16"  # from the cache, no measuring
    assert calibrate.cached_precision(64, 2) is None  # not measured at 2 threads
    rates["bf16"] = 300.0 * calibrate.BF16_MARGIN * 0.99  # faster, but not by the margin
    assert calibrate.choose_precision("cpu", 64, 2)[0] == "fp32"
    assert calibrate.cached_precision(64, 2) == "fp32"
    assert len(rates["calls"]) == 4


def test_a_run_never_trains_in_auto(tmp_path):
    cfg = RunConfig(dataset="synthetic", model="mlp3x100", limit_train=64, limit_test=32,
                    epochs=1, batch_size=32, device="cpu", precision="auto")
    with pytest.raises(UserError, match="a run trains in fp32 or bf16"):
        train_run(cfg, tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_train_chooses_before_the_run_id(rates, tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "train", "--dataset", "synthetic", "--model", "mlp3x100",
                         "--device", "cpu", "--epochs", "1", "--limit-train", "64",
                         "--limit-test", "32", "--batch-size", "32", "--precision", "auto",
                         "--out", tmp_path / "runs")
    assert rc == 0 and "precision auto: bf16" in out
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert json.loads((run / "config.json").read_text())["config"]["precision"] == "bf16"
    assert run.name == RunConfig(dataset="synthetic", model="mlp3x100", device="cpu", epochs=1,
                                 limit_train=64, limit_test=32, batch_size=32,
                                 precision="bf16").run_id()


def test_a_study_chooses_once_and_keeps_its_folder_s_choice(rates, tmp_path, capsys):
    spec, out = tmp_path / "tiny.toml", tmp_path / "out"
    spec.write_text(textwrap.dedent(TINY))
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 0 and "precision auto: bf16 (ResNet-20 trains 500 images/s" in stdout
    doc = json.loads((out / "study.json").read_text())
    assert doc["precision_auto"] == "bf16" and doc["spec"]["base"]["precision"] == "auto"
    for r in doc["runs"]:
        config = json.loads((out / r["run_id"] / "config.json").read_text())["config"]
        assert config["precision"] == "bf16"
    assert {r.cfg.precision for r in api.Study.from_folder(out).plan.runs} == {"bf16"}

    # the machine now measures fp32 faster: the folder's runs are kept, none trained again
    rates.update(fp32=900.0)
    (tmp_path / "cache" / calibrate.FILE).unlink()
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 0 and "4 already finished, 0 to run" in stdout, stdout
    assert "precision auto: bf16 (the choice recorded in" in stdout
    # a new folder chooses again
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "other")
    assert rc == 0 and "precision auto: fp32" in stdout


def test_a_folder_begun_in_a_fixed_precision_goes_on_in_it(rates, tmp_path, capsys):
    """A study begun before its spec said "auto" (runs in bf16, no recorded choice) resumes in
    bf16 on a machine that would choose fp32: nothing trained again, nothing mixed."""
    spec, out = tmp_path / "tiny.toml", tmp_path / "out"
    spec.write_text(textwrap.dedent(TINY).replace('precision = "auto"', 'precision = "bf16"'))
    assert 'precision = "bf16"' in spec.read_text()
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 0 and "precision auto" not in stdout
    spec.write_text(textwrap.dedent(TINY))
    rates.update(fp32=900.0)  # this machine would now choose fp32
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 0 and "4 already finished, 0 to run" in stdout, stdout
    assert "precision auto: bf16 (the precision of the 4 runs begun in" in stdout
    assert json.loads((out / "study.json").read_text())["precision_auto"] == "bf16"


def test_the_estimate_of_a_folder_begun_in_a_fixed_precision_counts_its_runs(rates, tmp_path,
                                                                             capsys):
    """`study list` reads such a folder as study run resumes it: its runs are done, whatever
    this machine's cached choice (here fp32) would say."""
    from bnlab.study import status
    from bnlab.study.expand import expand
    from bnlab.study.spec import load_spec

    spec, out = tmp_path / "tiny.toml", tmp_path / "out"
    spec.write_text(textwrap.dedent(TINY).replace('precision = "auto"', 'precision = "bf16"'))
    assert run_cli(capsys, "study", "run", spec, "--out", out)[0] == 0
    spec.write_text(textwrap.dedent(TINY))
    rates.update(fp32=900.0)
    calibrate.choose_precision("cpu", 32, 1)  # the cache now says fp32 for this machine
    plan = expand(load_spec(str(spec)))
    assert status.folder_precision(plan, out)[0] == "bf16"
    assert status.study_estimate(plan, "cpu", out) == "done"
    assert status.folder_precision(plan, tmp_path / "new") is None


def test_precision_errors_name_the_choices(capsys, tmp_path):
    one_line_error(capsys, ["train", "--precision", "fp16", "--out", tmp_path],
                   "'fp16'", "fp32", "bf16", "auto")
