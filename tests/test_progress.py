"""Study progress: plain lines off a terminal, a bar on one, and the measured ETA."""

from __future__ import annotations

import io

import pytest

from bnlab.config import RunConfig
from bnlab.store import Store
from bnlab.study import progress as P
from bnlab.study.spec import expand, parse_spec

SPEC = {"name": "tiny", "base": {"dataset": "synthetic", "model": "mlp3x100", "epochs": 2,
                                 "device": "cpu"},
        "grid": {"norm": ["bn", "none"], "seed": [0, 1]}}


@pytest.fixture
def plan_store(tmp_path):
    return expand(parse_spec(SPEC)), Store(tmp_path / "out")


def _record(store: Store, cfg: RunConfig, status: str, epochs_done: int) -> None:
    run = store.run(cfg.run_id())
    run.write_json("config.json", {"config": cfg.to_dict()})
    run.write_json("summary.json", {"run_id": cfg.run_id(), "status": status,
                                    "epochs_done": epochs_done, "test_acc": 0.5,
                                    "wall_time": 1.25})
    store.record(run)


def test_plain_lines_off_a_terminal(plan_store):
    plan, store = plan_store
    stream = io.StringIO()
    with P.Progress(plan, store, stream=stream, tty=False) as p:
        p.log("study tiny: 4 runs")
        first = plan.runs[0].cfg
        _record(store, first, "completed", 2)
        p.finished({"run_id": first.run_id(), "status": "completed", "test_acc": 0.5,
                    "wall_time": 1.25})
    lines = stream.getvalue().splitlines()
    assert lines[0] == "study tiny: 4 runs"
    assert lines[1].startswith(f"[1/4] {first.run_id()}: completed, test acc 0.5000, 1.2 s; "
                               "study ETA ")
    assert len(lines) == 2 and "\r" not in stream.getvalue()


def test_eta_is_epochs_left_over_the_measured_rate(plan_store, monkeypatch):
    plan, store = plan_store
    clock = [100.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    _record(store, plan.runs[0].cfg, "completed", 2)  # done before this runner started
    p = P.Progress(plan, store, stream=io.StringIO(), tty=False)
    assert p.measure() == (1, 2, None)  # no rate measured yet
    clock[0] += 30.0
    _record(store, plan.runs[1].cfg, "running", 1)
    _record(store, plan.runs[2].cfg, "failed", 0)  # an ended run counts all its epochs
    runs_done, done, eta = p.measure()
    assert (runs_done, done) == (2, 5)
    assert eta == pytest.approx((8 - 5) / ((5 - 2) / 30.0))


def test_bar_on_a_terminal_keeps_log_lines_whole(plan_store):
    plan, store = plan_store
    stream = io.StringIO()
    with P.Progress(plan, store, stream=stream, tty=True) as p:
        p.log("a line above the bar")
        _record(store, plan.runs[0].cfg, "running", 1)
    text = stream.getvalue()
    assert "a line above the bar\n" in text
    last = text.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith("tiny ") and "1/8 epochs" in last and "0/4 runs, ETA" in last
