"""`bnlab study run --jobs`: the automatic choice (auto_jobs) and the worker processes that
train several runs each (run_parallel)."""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

import pytest
import torch

from bnlab import machine as facts
from bnlab.config import RunConfig
from bnlab.store import Store
from bnlab.study.executors import longest_first
from bnlab.study.jobs import auto_jobs
from tests.helpers import run_cli

QUICK_LIKE = dict(dataset="cifar10", model="resnet20", limit_train=5000, limit_test=2000,
                  epochs=3, batch_size=64, device="cpu")


def runs(n: int, **over) -> list:
    return [SimpleNamespace(cfg=RunConfig(**{**QUICK_LIKE, "seed": s, **over})) for s in range(n)]


@pytest.fixture
def machine(monkeypatch):
    """A 2-core machine with 24 GiB available, unless a test says otherwise."""
    state = {"cores": 2, "gib": 24.0}
    monkeypatch.setattr(facts, "usable_cores", lambda: state["cores"])
    monkeypatch.setattr(facts, "available_gib", lambda: state["gib"])
    return state


def test_small_cpu_runs_train_one_single_threaded_run_per_core(machine):
    assert auto_jobs(runs(3), runs(3))[:2] == (2, 1)
    machine["cores"] = 8
    assert auto_jobs(runs(3), runs(3))[:2] == (3, 1)  # no more workers than runs left
    machine["gib"] = 4.5
    assert auto_jobs(runs(3), runs(3))[:2] == (2, 1)  # one per 2 GiB available


def test_threads_depend_on_the_study_not_on_the_runs_left(machine):
    """A run resumed alone computes with the thread count it had beside the others (float
    sums in another order would give other numbers)."""
    assert auto_jobs(runs(3), runs(1))[:2] == (1, 1)
    machine["gib"] = 1.0
    assert auto_jobs(runs(3), runs(3))[:2] == (1, 1)


@pytest.mark.parametrize("why, study", [
    ("one run", runs(1)),
    ("a large network", runs(2, model="resnet18", dataset="synthetic", limit_train=50_000)),
    ("runs too short", runs(3, limit_train=512)),  # 1,536 + 170 training images a run
    ("runs too short", runs(2, dataset="synthetic", limit_train=0, limit_test=0, epochs=2)),
])
def test_everything_else_trains_one_run_at_a_time_on_all_cores(machine, why, study):
    jobs, threads, text = auto_jobs(study, study)
    assert (jobs, threads) == (1, None) and why in text


def test_one_core_or_a_gpu_trains_one_run_at_a_time(machine, monkeypatch):
    machine["cores"] = 1
    assert auto_jobs(runs(3), runs(3))[:2] == (1, None)
    machine["cores"] = 2
    assert auto_jobs(runs(3, device="cuda"), runs(3, device="cuda"))[:2] == (1, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_jobs(runs(3, device="auto"), runs(3, device="auto"))[:2] == (1, None)


SPEC = """
name = "workers"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 128
limit_test = 64
epochs = 1
batch_size = 32
device = "cpu"
[grid]
seed = [0, 1, 2, 3]
"""


def test_two_workers_train_four_runs(tmp_path, capsys):
    """--jobs 2: two worker processes for four runs (a worker takes the next run when it
    finishes one; which takes how many is up to timing), every run trained once, with the
    thread count asked for (cores // jobs)."""
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    rc, out, _ = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o", "--jobs", "2")
    assert rc == 0, out
    assert "--jobs 2 ->" in out
    attempts = Store(tmp_path / "o").attempts()
    assert len(attempts) == 4 and all(len(a) == 1 for a in attempts.values())
    pids = [a[0]["pid"] for a in attempts.values()]
    assert len(set(pids)) == 2
    threads = {json.loads((tmp_path / "o" / rid / "config.json").read_text())["env"]
               ["torch_threads"] for rid in attempts}
    assert threads == {max(1, facts.usable_cores() // 2)}


def test_auto_says_what_it_chose(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC).replace("seed = [0, 1, 2, 3]", "seed = [0, 1]"))
    rc, out, _ = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o")
    assert rc == 0, out
    assert "--jobs 1 (auto: runs too short to start workers for) ->" in out


def test_a_fresh_machine_builds_the_kernels_while_it_decodes_the_data(tmp_path, monkeypatch):
    """prepare_machine: the kernel build (in a thread) and the data's decoding overlap; where
    the kernels are built already it does nothing."""
    import threading
    import time

    from bnlab.fast import cpu_kernels
    from bnlab.study import worker

    monkeypatch.setattr(cpu_kernels, "build_dir", lambda: tmp_path / "ext")
    events = []

    def build(log=None):
        events.append(("build", threading.current_thread() is threading.main_thread()))
        time.sleep(0.3)
        events.append(("built", None))

    def decode(cfg):
        events.append(("decode", cfg.seed))
        time.sleep(0.3)
        events.append(("decoded", None))

    monkeypatch.setattr(cpu_kernels, "prepare", build)
    monkeypatch.setattr(worker, "data_for", decode)
    cfgs = [r.cfg for r in runs(3)]
    worker.prepare_machine(cfgs)
    names = [e[0] for e in events]
    assert ("build", False) in events and ("decode", 0) in events  # the build off the main thread
    assert names.index("built") > names.index("decode") and names.index("decoded") > \
        names.index("build")  # each began before the other ended
    (tmp_path / "ext").mkdir()
    (tmp_path / "ext" / "ready").write_text("lib.so")
    events.clear()
    worker.prepare_machine(cfgs)
    assert events == []


DYING_ENTRY = '''
import os
from pathlib import Path

import torch
from torch import nn

MARK = Path(__file__).with_name("died")


def die_once(num_classes, norm, in_channels, image_size):
    """The first real build anywhere ends its process (the runner's checks build on the meta
    device, and are spared)."""
    if torch.empty(0).device.type != "meta" and not MARK.exists():
        MARK.write_text("")
        os._exit(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size ** 2, 16),
                         norm(16, dim=1), nn.ReLU(), nn.Linear(16, num_classes))
'''


@pytest.mark.slow  # three worker processes start, one after another dies
def test_a_dead_worker_s_run_is_recorded_and_the_others_go_on(tmp_path, capsys):
    """A worker that dies (here: os._exit in the network's constructor) has its run recorded as
    failed with the exit code, and a new worker trains the runs left."""
    entry = tmp_path / "dying.py"
    entry.write_text(DYING_ENTRY)
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC).replace('model = "mlp3x100"',
                                                  f'model = "entry:{entry}:die_once"')
                    .replace("seed = [0, 1, 2, 3]", "seed = [0, 1, 2]"))
    rc, out, _ = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o", "--jobs", "2")
    assert rc == 1, out  # a run did not finish
    store = Store(tmp_path / "o")
    statuses = {rid: store.run(rid).summary["status"] for rid in store.attempts()}
    assert sorted(statuses.values()) == ["completed", "completed", "failed"], statuses
    dead = next(rid for rid, s in statuses.items() if s == "failed")
    assert "worker process died with exit code 3" in store.run(dead).summary["error"]
    pids = {a[0]["pid"] for a in store.attempts().values()}
    assert len(pids) == 3  # the dead worker, the other, and the one that replaced it


def test_workers_take_the_longest_runs_first():
    """Twice the epochs is about twice the time; a probed run costs more than the same run
    unprobed; equal runs, and runs of a dataset of unknown size (no estimate), keep their
    order. Seeds name the runs here."""
    plain = runs(3)
    probed = [SimpleNamespace(cfg=RunConfig(**{**QUICK_LIKE, "seed": 10 + s, "probe_every": 78}))
              for s in range(2)]
    longer = runs(1, epochs=6, seed=20)
    unknown = runs(1, dataset="imagefolder:/nowhere", seed=30)
    order = longest_first(plain + unknown + probed + longer)
    assert [r.cfg.seed for r in order] == [20, 10, 11, 0, 1, 2, 30]
