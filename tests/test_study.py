"""Studies: spec parsing and expansion, one-line errors, the runner's skip/resume/failure
isolation, SIGKILL equivalence and two-runner locking (all on the synthetic dataset)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
import torch
from helpers import run_cli

from bnlab import api, cli
from bnlab.config import RunConfig
from bnlab.errors import UserError
from bnlab.norm import NORMS
from bnlab.store import FINISHED as FINAL
from bnlab.store import Store
from bnlab.study.spec import builtin_names, expand, load_spec, parse_spec, with_seeds
from bnlab.study.status import status_rows
from bnlab.study.worker import run_one

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"epoch_time", "train_images_per_s"}  # the only fields of metrics.jsonl that vary

TINY = """
name = "tiny"
description = "test study"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 128
limit_test = 128
batch_size = 32
epochs = 2
lr = 0.05
device = "cpu"
[grid]
norm = ["bn", "none"]
seed = [0, 1]
"""


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return e


def runner(spec: Path, out: Path, *extra, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bnlab", "study", "run", str(spec), "--out",
                             str(out), *extra], cwd=ROOT, env=env(), stdout=stdout,
                            stderr=subprocess.STDOUT, text=True)


# -- specs -------------------------------------------------------------------------------------
def test_expansion_counts_cases_and_stable_ids():
    spec = parse_spec({
        "name": "t", "base": {"dataset": "synthetic", "epochs": 3},
        "grid": {"norm": ["bn", "none"], "seed": [0, 1, 2]},
        "cases": [{"where": {"norm": "none"}, "grid": {"lr": [0.01, 0.02]}},
                  {"where": {"norm": "none", "lr": 0.02}, "set": {"epochs": 5}}],
        "analysis": {"select_best": ["lr"], "select_on": "test", "baseline": {"norm": "bn"}}})
    plan = expand(spec)
    assert len(plan.runs) == 3 + 3 * 2
    bn = [r.cfg for r in plan.runs if r.cfg.norm == "bn"]
    none = [r.cfg for r in plan.runs if r.cfg.norm == "none"]
    assert {c.lr for c in bn} == {0.1} and {c.epochs for c in bn} == {3}
    assert sorted((c.lr, c.epochs) for c in none) == [(0.01, 3)] * 3 + [(0.02, 5)] * 3
    ids = [r.run_id for r in plan.runs]
    assert len(set(ids)) == len(ids)
    assert ids == [r.run_id for r in expand(spec).runs]  # stable
    assert ids[0] == RunConfig(dataset="synthetic", epochs=3, norm="bn", seed=0).run_id()
    assert plan.axes == ["norm", "seed", "lr", "epochs"]
    assert plan.runs[0].values == {"norm": "bn", "seed": 0, "lr": 0.1, "epochs": 3,
                                   "dataset": "synthetic"}


def test_set_only_and_data_map():
    spec = parse_spec({"name": "t", "base": {"dataset": "cifar10"},
                       "grid": {"norm": ["bn", "none"], "seed": [0, 1], "epochs": [1, 2]}})
    plan = expand(spec, sets=[("epochs", 7)], only=[("norm", "none")],
                  data_map={"cifar10": "synthetic"})
    # --set collapses the epochs axis; duplicates are kept once
    assert len(plan.runs) == 2
    assert {r.cfg.epochs for r in plan.runs} == {7}
    assert {r.cfg.dataset for r in plan.runs} == {"synthetic"}
    assert {r.values["dataset"] for r in plan.runs} == {"cifar10"}
    doc = plan.study_json()
    assert doc["sets"] == {"epochs": 7} and doc["only"] == {"norm": "none"}
    assert doc["data_map"] == {"cifar10": "synthetic"} and doc["axes"] == ["seed"]
    # --only on the spec's dataset name still matches after mapping
    assert len(expand(spec, only=[("dataset", "cifar10")],
                      data_map={"cifar10": "synthetic"}).runs) == 8


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_specs_parse_and_expand(name):
    from bnlab.study.preflight import _registries

    spec = load_spec(name)
    assert spec.name == name and spec.description
    assert not {"cpu_minutes", "gpu_minutes"} & set(spec.estimate)  # from measurements
    plan = expand(spec)
    assert len(plan.runs) >= 2
    # names not yet registered here must be ones the norm/init libraries are to provide
    planned = {"norm": {"bn", "bn_ref", "bn_posscale", "bn_l2", "bn_l2_sum", "batch_renorm",
                        "cumulative",
                        "ghost", "frozen", "group", "layer", "instance", "none"},
               "init": {"kaiming", "xavier", "fixup", "zero_residual"}}
    for kind, names in _registries().items():
        for r in plan.runs:
            value = getattr(r.cfg, kind)
            assert value in names or value in planned.get(kind, ()), (kind, value)


def test_builtin_sizes():
    sizes = {n: len(expand(load_spec(n)).runs) for n in builtin_names()}
    assert sizes["quick"] == 9  # bn, none at bn's lr, fixup x 3 seeds
    assert sizes["bn-paper-mnist"] >= 2
    # datasets x (bn + none at BN's lr + none at its tuned lr + fixup) x 3 seeds, and the 4
    # tuning runs (seed 0, short) of the tuned arm on each dataset
    plan = expand(load_spec("seed"))
    assert len(plan.runs) + len(plan.waiting) == 3 * 4 * 3 and len(plan.tune_runs) == 3 * 4
    assert sizes["seed"] == 3 * 4 * 3 - 3 * 3  # the tuned arm waits for its tuning
    variants = expand(load_spec("variants"))
    assert len(variants.all_runs) == len(NORMS) * 3 + 4  # every norm x 3 seeds + 4 tuning runs


@pytest.mark.parametrize("text,expected", [
    ("[grid]\nnrom = ['bn']\n", "unknown key 'nrom'"),
    ("[grdi]\nnorm = ['bn']\n", "unknown key 'grdi'"),
    ("[grid]\n", "empty [grid]"),
    ("[grid]\nnorm = []\n", "empty list"),
    ("[grid]\nnorm = 'bn'\n", "must be a list"),
    ("[grid]\nschedule = ['step', 'stpe']\n", "'stpe' is not accepted"),
    ("[grid]\nepochs = [1, 'x']\n", "epochs must be an integer"),
    ("[grid]\nseed = [0]\n[[cases]]\nwhere = {norm = 'nonee'}\nset = {lr = 0.1}\n",
     "matches no run"),
    ("[grid]\nseed = [0]\n[[cases]]\nwhere = {norm = 'bn'}\n", "neither set nor grid"),
    ("[grid]\nseed = [0]\n[analysis]\nselect_bset = ['lr']\n", "unknown key 'select_bset'"),
    ("[grid]\nseed = [0]\n[estimate]\ncpu_minutes = -1\n", "minutes >= 0"),
    ("[grid]\nseed = [0]\n[analysis]\nbaseline = {norm = 'group'}\n", "matches no run"),
    ("[grid]\nlr = [0.1, 0.2]\n[analysis]\nselect_best = ['lr']\n",
     "selects lr on a validation split, but run"),
    ("[grid]\nlr = [0.1]\n[analysis]\nselect_on = 'train'\n", "select_on must be one of"),
    ("[base]\nepochs = 2\nwarmup_epochs = 1\n[grid]\nwarmup_epochs = [1, 3]\n",
     "warmup_epochs must be <= epochs"),
    ("name = 'bad name'\n[grid]\nseed = [0]\n", "name must be"),
    ("[grid\n", "not valid TOML"),
])
def test_spec_errors_are_one_line_exit_2(tmp_path, capsys, text, expected):
    spec = write(tmp_path, text)
    rc, _, err = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o")
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("bnlab: error: ")
    assert expected in err
    assert not (tmp_path / "o").exists()


def test_suggestions_and_command_line_errors(tmp_path, capsys):
    spec = write(tmp_path, TINY)
    cases = [
        (["study", "run", "quik"], "did you mean 'quick'?"),
        (["study", "run", spec, "--set", "epoch=3"], "did you mean 'epochs'?"),
        (["study", "run", spec, "--set", "epochs"], "expects key=value"),
        (["study", "run", spec, "--set", "epochs=two"], "epochs must be an integer"),
        (["study", "run", spec, "--only", "norm=group"], "no run of study 'tiny' matches"),
        (["study", "run", spec, "--data-map", "cifar10=synthetic"], "not a dataset of study"),
        (["study", "run", spec, "--set", "norm=bnn"], "unknown norm 'bnn'"),
        (["study", "run", spec, "--set", "dataset=imagenet"], "--data-map imagenet="),
        (["study", "run", spec, "--set", f"dataset=imagefolder:{tmp_path / 'no-such'}"],
         f"image folder '{tmp_path / 'no-such'}' of study 'tiny' does not exist"),
        (["study", "run", spec, "--jobs", "0"], "expected an integer >= 1 or auto, got '0'"),
        (["study", "run", spec, "--seeds", "0"], "expected an integer >= 1, got '0'"),
        (["study", "run", write(tmp_path, TINY.replace("seed = [0, 1]", ""), "noseed.toml"),
          "--seeds", "3"], "study 'tiny' has no seed axis in its [grid]"),
        (["study", "status", tmp_path], "not a study output folder"),
        (["study", "report", "quick", "--out", tmp_path / "nothing"], "no study results"),
    ]
    for argv, expected in cases:
        rc, _, err = run_cli(capsys, *argv, *(["--out", tmp_path / "o"]
                                             if argv[1] == "run" else []))
        assert rc == 2, argv
        assert err.count("\n") == 1 and expected in err, (argv, err)


# -- the runner --------------------------------------------------------------------------------
def test_run_skip_status_and_study_json(tmp_path, capsys):
    spec, out = write(tmp_path, TINY), tmp_path / "out"
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 0, stdout
    doc = json.loads((out / "study.json").read_text())
    assert set(doc) == {"name", "description", "spec", "sets", "only", "data_map", "axes",
                        "runs", "analysis"}
    assert doc["name"] == "tiny" and doc["axes"] == ["norm", "seed"]
    assert doc["spec"]["grid"] == {"norm": ["bn", "none"], "seed": [0, 1]}
    assert doc["analysis"] == {"select_best": [], "select_on": "val", "compare": False,
                               "corruptions": True, "baseline": {}}
    assert [r["values"] for r in doc["runs"]] == [
        {"norm": n, "seed": s, "dataset": "synthetic"} for n in ("bn", "none") for s in (0, 1)]
    store = Store(out)
    for r in doc["runs"]:
        s = store.run(r["run_id"]).summary
        assert s["status"] in FINAL and s["epochs_done"] == 2
        assert len(store.run(r["run_id"]).metrics()) == 2
    before = {r["run_id"]: (out / r["run_id"] / "metrics.jsonl").read_bytes()
              for r in doc["runs"]}

    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 0 and "4 already finished, 0 to run" in stdout
    assert {k: len(v) for k, v in store.attempts().items()} == {k: 1 for k in before}
    assert before == {k: (out / k / "metrics.jsonl").read_bytes() for k in before}

    rc, stdout, _ = run_cli(capsys, "study", "status", out)
    assert rc == 0 and "study tiny in" in stdout
    assert "pending" not in stdout and "running" not in stdout
    assert all(k in stdout for k in before)


def test_more_seeds_train_only_the_new_seeds(tmp_path, capsys):
    spec, out = write(tmp_path, TINY), tmp_path / "out"
    assert run_cli(capsys, "study", "run", spec, "--out", out)[0] == 0
    first = {r["run_id"] for r in json.loads((out / "study.json").read_text())["runs"]}
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out, "--seeds", "3")
    assert rc == 0 and "4 already finished, 2 to run" in stdout, stdout
    doc = json.loads((out / "study.json").read_text())
    assert doc["spec"]["grid"]["seed"] == [0, 1, 2]
    assert [(r["values"]["norm"], r["values"]["seed"]) for r in doc["runs"]] == [
        (n, s) for n in ("bn", "none") for s in (0, 1, 2)]
    assert first < {r["run_id"] for r in doc["runs"]}  # the first seeds' runs kept as they were
    # the folder's own plan has the 3 seeds: status counts 6 finished runs
    assert len(api.Study.from_folder(out).plan.runs) == 6
    # fewer seeds than the spec's: a subset, nothing retrained
    assert len(expand(with_seeds(parse_spec(tomllib.loads(TINY)), 1)).runs) == 2


def test_compare_after_the_runs(tmp_path, capsys):
    spec = write(tmp_path, TINY + """
    [analysis]
    compare = true
    """)
    out = tmp_path / "out"
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 0 and "comparing the predictions of 2 arms" in stdout
    result = json.loads((out / "analysis" / "compare.json").read_text())
    doc = json.loads((out / "study.json").read_text())
    ids = {(r["values"]["norm"], r["values"]["seed"]): r["run_id"] for r in doc["runs"]}
    # every seed of every arm, so that arms are read against seed-to-seed variation
    assert [(r["arm"], r["run_id"]) for r in result["runs"]] == [
        (f"norm={n}", ids[n, s]) for n in ("bn", "none") for s in (0, 1)]
    assert [(a["kind"], a["pairs"]) for a in result["agreement"]] == [
        ("between", 4), ("within", 1), ("within", 1)]
    for m in result["runs"]:  # the comparison's accuracy is the run's own final accuracy
        assert abs(m["test_acc"] - Store(out).run(m["run_id"]).summary["test_acc"]) <= 1 / 128
    # a second invocation finds the comparison of the same runs and leaves it alone
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 0 and "comparing" not in stdout


def test_failure_isolation(tmp_path, capsys):
    spec = write(tmp_path, TINY + """
    [[cases]]
    where = { norm = "none", seed = 0 }
    set = { lr = 1e30 }                  # diverges at once
    [[cases]]
    where = { norm = "bn", seed = 1 }
    set = { norm_options = { bogus = 1 } }  # refused by the norm factory at run time
    """)
    out = tmp_path / "out"
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 1
    store = Store(out)
    rows = {r["run_id"]: r for r in status_rows(store, [r["run_id"] for r in json.loads(
        (out / "study.json").read_text())["runs"]])}
    statuses = [r["status"] for r in rows.values()]
    assert statuses.count("diverged") == 1 and statuses.count("failed") == 1
    assert all(s in FINAL for s in statuses if s != "failed")
    failed = next(r for r in rows.values() if r["status"] == "failed")
    assert "bogus" in failed["error"]
    assert store.run(failed["run_id"]).config["norm_options"] == {"bogus": 1}
    # a second invocation retries only the failed run
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 1 and "3 already finished, 1 to run" in stdout
    counts = {k: len(v) for k, v in store.attempts().items()}
    assert counts == {k: 2 if k == failed["run_id"] else 1 for k in rows}


def test_run_one_leaves_locked_runs_alone(tmp_path):
    cfg = RunConfig(dataset="synthetic", model="mlp3x100", limit_train=64, limit_test=64,
                    batch_size=32, epochs=1, device="cpu")
    store = Store(tmp_path)
    with store.lock(cfg.run_id()) as held:
        assert held
        assert store.is_locked(cfg.run_id())
        assert run_one(cfg, tmp_path, log=lambda s: None, wait=False) == {
            "run_id": cfg.run_id(), "status": "busy"}
    assert not store.is_locked(cfg.run_id())
    assert run_one(cfg, tmp_path, log=lambda s: None, wait=False)["status"] in FINAL


# -- crashes and concurrency (real processes) ---------------------------------------------------
KILL_SPEC = """
name = "killme"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 256
limit_test = 128
batch_size = 32
epochs = 4
lr = 0.1
device = "cpu"
[grid]
norm = ["bn", "none"]
seed = [0, 1]
"""


def _final_state(out: Path) -> dict:
    doc = json.loads((out / "study.json").read_text())
    state = {}
    for r in doc["runs"]:
        run = Store(out).run(r["run_id"])
        rows = [{k: v for k, v in m.items() if k not in TIMING} for m in run.metrics()]
        ckpt = run.load_checkpoint()
        state[r["run_id"]] = (run.summary["status"], rows,
                              {k: v.clone() for k, v in ckpt["model"].items()})
    return state


@pytest.mark.slow  # about a minute: kills a runner at many moments
def test_sigkill_at_any_moment_then_resume_equals_clean_run(tmp_path):
    spec = write(tmp_path, KILL_SPEC)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    t0 = time.monotonic()
    p = runner(spec, clean)
    p.communicate()
    assert p.returncode == 0
    duration = time.monotonic() - t0

    # first kill: right after a run has logged its 2nd epoch (so mid-run for certain), then at
    # random moments; then a last runner that finishes the study
    p = runner(spec, killed)
    for line in p.stdout:
        if "epoch 2/4" in line:
            p.send_signal(signal.SIGKILL)
            break
    p.wait()
    rng = random.Random(int(os.environ.get("BNLAB_TEST_SEED", "0")))
    for _ in range(2):
        with open(tmp_path / "log.txt", "a") as f:
            p = runner(spec, killed, stdout=f)
            time.sleep(rng.uniform(0.2, duration))
            p.send_signal(signal.SIGKILL)
            p.wait()
    p = runner(spec, killed)
    p.communicate()
    assert p.returncode == 0

    a, b = _final_state(clean), _final_state(killed)
    assert a.keys() == b.keys()
    for run_id in a:
        assert a[run_id][0] == b[run_id][0] and a[run_id][0] in FINAL
        assert a[run_id][1] == b[run_id][1]  # every loss and accuracy, bit for bit
        for k, v in a[run_id][2].items():
            assert torch.equal(v, b[run_id][2][k]), (run_id, k)
    attempts = Store(killed).attempts()
    assert any(x["from_epoch"] > 0 for xs in attempts.values() for x in xs)  # a real resume


@pytest.mark.slow  # the race itself runs 25 times in the slow suite below
def test_two_runners_never_train_a_run_twice(tmp_path):
    spec = write(tmp_path, KILL_SPEC.replace("seed = [0, 1]", "seed = [0, 1, 2]")
                 .replace("epochs = 4", "epochs = 2"))
    out = tmp_path / "out"
    procs = [runner(spec, out), runner(spec, out, "--jobs", "2")]
    logs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    starts = [line.split(":")[0] for log in logs for line in log.splitlines()
              if line.endswith(": starting")]
    doc = json.loads((out / "study.json").read_text())
    ids = sorted(r["run_id"] for r in doc["runs"])
    assert sorted(starts) == ids
    attempts = Store(out).attempts()
    assert sorted(attempts) == ids and all(len(v) == 1 for v in attempts.values())
    assert all(Store(out).run(i).summary["status"] in FINAL for i in ids)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(25))
def test_two_runners_never_train_a_run_twice_repeatedly(tmp_path, trial):
    """The two-runner test again and again (it failed once under load: log lines split by
    worker output between print()'s two writes, see bnlab/study/progress.py)."""
    test_two_runners_never_train_a_run_twice(tmp_path)


def _open_store(path, barrier, results):
    barrier.wait()  # every process opens the fresh index at the same moment
    try:
        Store(path)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put(repr(e))


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """Switching a new index to WAL takes a lock SQLite does not wait for; several runners
    starting on one folder used to fail with 'database is locked' (about 1 open in 16 here)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    outcomes = []
    for trial in range(12):
        barrier, results = ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_open_store, args=(tmp_path / str(trial), barrier, results))
                 for _ in range(8)]
        for p in procs:
            p.start()
        outcomes += [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
    assert outcomes == ["ok"] * len(outcomes)


def test_user_error_from_bad_spec_leaves_nothing(tmp_path):
    with pytest.raises(UserError):
        load_spec(str(tmp_path / "missing.toml"))


def test_study_packs_runs_that_share_a_network(tmp_path, monkeypatch, capsys):
    """The packing path of the runner (used for CUDA runs), exercised on the CPU: the runs that
    differ only in seed and norm (bn, none) train as one pack, each with its own folder, and a
    rerun skips them."""
    import bnlab.study.runner as runner

    monkeypatch.setattr(runner, "PACK_DEVICES", {"cpu", "cuda"})
    spec = write(tmp_path, TINY)
    rc, out, err = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o")
    assert rc == 0, err
    store = Store(tmp_path / "o")
    rows = store.rows()
    assert len(rows) == 4 and {r["status"] for r in rows} <= set(FINAL)
    for r in rows:
        metrics = store.run(r["run_id"]).metrics()
        assert [m["epoch"] for m in metrics] == [1, 2]
        assert all(m.get("packed") == 4 for m in metrics)
    rc, out, err = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o")
    assert rc == 0 and "4 already finished" in out + err
    rc, out, err = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "p", "--no-pack")
    assert rc == 0
    lone = Store(tmp_path / "p")
    assert all("packed" not in m for r in lone.rows() for m in lone.run(r["run_id"]).metrics())


def test_estimates_come_from_measured_throughput():
    """Minutes = images (training + a third of each evaluation image) / measured images/s;
    packs take the packed rate on a GPU; unknown sizes, batches and models say unmeasured."""
    from bnlab.study import estimate as E

    spec = parse_spec({"name": "e", "base": {"dataset": "cifar10", "limit_train": 5000,
                                             "limit_test": 2000, "epochs": 4},
                       "grid": {"norm": ["bn", "none"], "seed": [0, 1]}})
    cfgs = [r.cfg for r in expand(spec).runs]
    per_run = 4 * (5000 + 2000 / 3)
    cpu = E.estimate(cfgs, "cpu")
    assert cpu.minutes == pytest.approx(4 * per_run / 1050 / 60) and not cpu.scaled
    gpu = E.estimate(cfgs, "gpu")  # one pack of 4: the packed rate
    assert gpu.minutes == pytest.approx(4 * per_run / 92_000 / 60)
    deep = [dataclasses.replace(c, model="resnet56", val_fraction=0.1) for c in cfgs]
    est = E.estimate(deep, "cpu")
    per_run = 4 * (4500 + (2000 + 500) / 3)
    assert est.scaled and est.minutes == pytest.approx(4 * per_run * 54 / 18 / 1050 / 60)
    assert E.estimate([dataclasses.replace(cfgs[0], batch_size=2)], "cpu").minutes is None
    folder = dataclasses.replace(cfgs[0], dataset="imagenet", limit_train=0, limit_test=0)
    assert "unknown" in E.estimate([folder], "cpu").missing
    big = E.estimate([folder], "cpu", {"imagenet": (9469, 3925, 224)})
    assert big.scaled and big.minutes == pytest.approx(
        4 * (9469 + 3925 / 3) * 49 / 1050 / 60)  # 224 px: 49 times the area of 32 px
    assert "unmeasured" in E.estimate([dataclasses.replace(cfgs[0], model="mlp3x100",
                                                           batch_size=60)], "gpu").missing
    listing = cli_text(["study", "list"])
    assert "unmeasured" in listing and "Estimated from measured throughput" in listing


def cli_text(argv) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
    return buf.getvalue()


def test_a_retried_run_that_fails_again_records_its_new_failure(tmp_path):
    """Two attempts failing for different reasons before training starts (its data): the
    stored failure is the second one's."""
    data = tmp_path / "mnist"
    cfg = RunConfig(dataset="mnist", data_dir=str(data), model="mlp3x100", epochs=1,
                    device="cpu")
    first = run_one(cfg, tmp_path / "out", log=lambda s: None)
    assert first["status"] == "failed" and "does not exist" in first["error"]
    data.write_text("")  # a file where the data folder should be
    second = run_one(cfg, tmp_path / "out", log=lambda s: None)
    assert second["status"] == "failed" and "is a file, not a folder" in second["error"]
    store = Store(tmp_path / "out")
    run = store.run(cfg.run_id())
    assert run.summary == second
    assert "is a file, not a folder" in (run.path / "error.txt").read_text()
    assert len(store.attempts()[cfg.run_id()]) == 2


def test_a_run_left_unfinished_makes_the_study_exit_1(tmp_path, capsys, monkeypatch):
    """Exit 0 means every run ended with a result: a run that a lost worker left interrupted
    (here: stopped after epoch 1 and returned) gives exit 1, as a failed one does."""
    import bnlab.study.worker as worker

    real = worker.train_run

    def lose_one(cfg, out, **kw):
        if not (cfg.norm == "none" and cfg.seed == 1):
            return real(cfg, out, **kw)

        def stop(line):
            if "epoch 1/2" in line:  # logged once epoch 1 is stored
                raise KeyboardInterrupt
        try:
            real(cfg, out, **{**kw, "log": stop})
        except KeyboardInterrupt:
            pass
        return Store(out).run(cfg.run_id()).summary

    monkeypatch.setattr(worker, "train_run", lose_one)
    spec, out = write(tmp_path, TINY), tmp_path / "out"
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 1, stdout
    ids = [r["run_id"] for r in json.loads((out / "study.json").read_text())["runs"]]
    statuses = sorted(r["status"] for r in status_rows(Store(out), ids))
    assert statuses.count("interrupted") == 1 and sum(s in FINAL for s in statuses) == 3
    monkeypatch.setattr(worker, "train_run", real)
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out)
    assert rc == 0 and "3 already finished, 1 to run" in stdout


def test_lost_cluster_jobs_are_recorded_and_the_study_exits_1(tmp_path, capsys, monkeypatch):
    """A job that died without a result is recorded as its run's failure (SlurmExecutor.wait);
    jobs lost without the executor knowing leave their runs pending: exit 1 either way."""
    from bnlab.study.executors import SlurmExecutor

    class Lost:
        job_id = "4242_1"

        def results(self):
            raise RuntimeError("Job 4242_1 was cancelled\n(preempted)")

    class Done:
        job_id = "4242_0"

        def results(self):
            return [{"run_id": "x", "status": "completed"}]

    cfgs = [RunConfig(dataset="synthetic", model="mlp3x100", seed=s, device="cpu")
            for s in (0, 1)]
    got = SlurmExecutor.wait([Done(), Lost()], lambda s: None, cfgs, tmp_path)
    assert got[0] == {"run_id": "x", "status": "completed"}
    run = Store(tmp_path).run(cfgs[1].run_id())
    assert got[1] == run.summary and run.summary["status"] == "failed"
    assert run.summary["error"] == "RuntimeError: job 4242_1 died: Job 4242_1 was cancelled " \
                                   "(preempted)"
    assert not Store(tmp_path).run(cfgs[0].run_id()).exists()

    monkeypatch.setattr(SlurmExecutor, "run", lambda self, cfgs, out, log: [])
    spec, out = write(tmp_path, TINY), tmp_path / "out"
    rc, stdout, _ = run_cli(capsys, "study", "run", spec, "--out", out, "--executor", "node")
    assert rc == 1 and "4 pending" in stdout
