"""The SLURM executor, run through submitit's local executor (same pickled tasks, local
processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import submitit  # noqa: F401 - imported at collection: its log handlers bind sys.stderr then

from bnlab.config import RunConfig
from bnlab.errors import UserError
from bnlab.store import Store
from bnlab.study.executors import RunTask, SlurmExecutor
from bnlab.study.options import SlurmOptions

ROOT = Path(__file__).resolve().parent.parent
HELPER = "bnlab.study.worker:run_one"


def _cfgs() -> list[RunConfig]:
    base = dict(dataset="synthetic", model="mlp3x100", limit_train=64, limit_test=32,
                batch_size=32, epochs=1, eval_batch_size=32, workers=0, device="cpu")
    return [RunConfig(**base, norm=norm) for norm in ("bn", "none")]


@pytest.fixture
def job_path(monkeypatch):
    # the job processes import bnlab from this tree
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


SPEC = """
name = "tiny-cluster"
description = "two runs through the submitit executor"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 64
limit_test = 32
batch_size = 32
epochs = 1
eval_batch_size = 32
workers = 0
device = "cpu"
[grid]
norm = ["bn", "none"]
"""


@pytest.mark.slow  # submitit's local executor starts a process per job
def test_two_run_study_through_submitit_local_executor(tmp_path, job_path):
    from bnlab.cli import main
    from bnlab.study.spec import expand, load_spec

    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    out = tmp_path / "study"
    argv = ["study", "run", str(spec), "--out", str(out), "--executor", "node", "--parallel", "2"]
    assert main(argv) == 0
    cfgs = [r.cfg for r in expand(load_spec(str(spec)), [], [], {}).runs]
    assert len(cfgs) == 2
    # results land in the study's store, one row per run, next to study.json
    rows = {r["run_id"]: r for r in Store(out).rows()}
    assert set(rows) == {c.run_id() for c in cfgs}
    assert all(rows[c.run_id()]["status"] in ("completed", "no_learning") for c in cfgs), rows
    assert json.loads((out / "study.json").read_text())["name"] == "tiny-cluster"
    for c in cfgs:
        metrics = (out / c.run_id() / "metrics.jsonl").read_text().splitlines()
        assert json.loads(metrics[0])["epoch"] == 1
    def jobs():  # one submitit job folder per run (named by job id)
        return [p for p in (out / "slurm").iterdir() if p.name.isdigit()]

    assert len(jobs()) == 2
    # running it again submits nothing
    assert main(argv) == 0
    assert len(jobs()) == 2


def test_unfinished_runs_are_resubmitted(tmp_path):
    cfgs = _cfgs()
    out = tmp_path / "study"
    store = Store(out)
    done = store.run(cfgs[0].run_id())
    done.write_json("config.json", {"config": cfgs[0].to_dict()})
    done.write_json("summary.json", {"status": "completed"})
    half = store.run(cfgs[1].run_id())
    half.write_json("config.json", {"config": cfgs[1].to_dict()})
    half.write_json("summary.json", {"status": "running"})
    ex = SlurmExecutor(tmp_path / "jobs", cluster="local", run_one=HELPER)
    assert ex.pending(cfgs, out) == [cfgs[1]]


def test_requeue_resubmits_the_same_run():
    task = RunTask(HELPER)
    cfg = _cfgs()[0].to_dict()
    delayed = task.checkpoint(cfg, "/tmp/x")
    assert delayed.args == (cfg, "/tmp/x")
    assert isinstance(delayed.function, RunTask) and delayed.function.run_one == HELPER


def test_slurm_parameters():
    p = SlurmOptions(partition="gpu", gpus_per_run=4, time=90, mem_gb=64, parallel=8,
                     extra={"qos": "high"}).parameters("slurm")
    assert p == {"timeout_min": 90, "nodes": 1, "tasks_per_node": 4, "cpus_per_task": 8,
                 "gpus_per_node": 4, "slurm_partition": "gpu", "mem_gb": 64,
                 "slurm_array_parallelism": 8, "slurm_additional_parameters": {"qos": "high"}}
    with pytest.raises(UserError, match="gpus-per-run"):
        SlurmOptions(gpus_per_run=0).validate()
    with pytest.raises(UserError, match="cannot import"):
        SlurmExecutor("/tmp/x", cluster="local", run_one="bnlab.nothing:run_one")
    with pytest.raises(UserError, match="cluster"):
        SlurmExecutor("/tmp/x", cluster="pbs", run_one="bnlab.train:train_run")


@pytest.mark.slow
def test_data_parallel_run_as_two_tasks(tmp_path, job_path):
    """gpus_per_run=2 on the CPU: two submitit tasks form a gloo group and train one run."""
    out = tmp_path / "study"
    cfg = _cfgs()[0]
    ex = SlurmExecutor(tmp_path / "jobs", SlurmOptions(gpus_per_run=2, cpus_per_gpu=1, time=10),
                       cluster="local", run_one=HELPER)
    results = ex.run([cfg], out)
    assert [r["run_id"] for r in results] == [cfg.run_id()]
    assert results[0]["status"] in ("completed", "no_learning"), results
    d = json.loads((out / cfg.run_id() / "config.json").read_text())["distributed"]
    assert d["world_size"] == 2 and d["per_device_batch"] == cfg.batch_size // 2
