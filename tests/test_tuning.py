"""The [tune] stage of a study: tuning runs on one seed at a short budget, the choice on the
validation split, the chosen value in every seed's run, resuming, and the one-line errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from bnlab import cli
from bnlab.store import Store
from bnlab.study.runner import run_study
from bnlab.study.spec import expand, load_spec, parse_spec
from bnlab.study.tuning import Tune, choose, group_key, tuning_configs

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = """
name = "tuned"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 160
limit_test = 64
val_fraction = 0.2
batch_size = 32
epochs = 3
lr = 0.05
device = "cpu"
[grid]
norm = ["bn", "none"]
seed = [0, 1]
[tune]
where = { norm = "none" }
axis = "lr"
values = [0.001, 0.02, 0.2]
seed = 0
set = { epochs = 1 }
"""


def spec(text: str = SPEC):
    import tomllib
    return parse_spec(tomllib.loads(textwrap.dedent(text)), source="table", default_name="t")


def test_plan_holds_tuning_runs_on_one_seed_and_the_tuned_runs_wait():
    plan = expand(spec())
    assert len(plan.runs) == 2 and {r.cfg.norm for r in plan.runs} == {"bn"}
    assert len(plan.waiting) == 2 and {r.cfg.seed for r in plan.waiting} == {0, 1}
    assert len(plan.groups) == 1
    tuning = plan.tune_runs
    assert [r.cfg.lr for r in tuning] == [0.001, 0.02, 0.2]
    assert {(r.cfg.seed, r.cfg.epochs, r.cfg.norm) for r in tuning} == {(0, 1, "none")}
    assert len(plan.all_runs) == 7


def test_a_choice_goes_into_every_seed_and_is_in_the_run_identity():
    plan = expand(spec())
    key = plan.groups[0].key
    chosen = plan.with_choices({key: 0.02})
    tuned = [r for r in chosen.runs if r.cfg.norm == "none"]
    assert not chosen.waiting and [r.cfg.lr for r in tuned] == [0.02, 0.02]
    assert {r.cfg.seed for r in tuned} == {0, 1} and {r.cfg.epochs for r in tuned} == {3}
    other = plan.with_choices({key: 0.2})
    assert {r.run_id for r in tuned}.isdisjoint(r.run_id for r in other.runs)
    assert chosen.study_json()["tuning"]["groups"][0]["chosen"] == 0.02


def test_group_key_ignores_seed_and_the_tuned_axis_only():
    plan = expand(spec())
    t = plan.spec.tune
    a, b = (r.cfg for r in plan.waiting)
    assert group_key(a, t) == group_key(b, t)
    import dataclasses
    assert group_key(dataclasses.replace(a, lr=1.0), t) == group_key(a, t)
    assert group_key(dataclasses.replace(a, momentum=0.5), t) != group_key(a, t)


def _summaries(tmp_path: Path, cfgs, outcomes) -> Store:
    store = Store(tmp_path)
    for cfg, (status, val) in zip(cfgs, outcomes):
        store.run(cfg.run_id()).write_json("summary.json", {
            "run_id": cfg.run_id(), "status": status, "epochs_done": 1,
            **({"val_acc": val} if val is not None else {})})
    return store


@pytest.mark.parametrize("outcomes, value, edge", [
    ([("completed", 0.30), ("completed", 0.50), ("completed", 0.40)], 0.02, None),
    # a diverged run is never chosen, whatever accuracy it recorded before diverging
    ([("completed", 0.30), ("completed", 0.20), ("diverged", 0.90)], 0.001, "lowest"),
    ([("no_learning", 0.10), ("failed", None), ("completed", 0.45)], 0.2, "highest"),
    # equal accuracies: the value listed first
    ([("completed", 0.40), ("completed", 0.40), ("completed", 0.10)], 0.001, "lowest"),
])
def test_choose_reads_final_validation_accuracy_of_runs_that_finished(tmp_path, outcomes,
                                                                      value, edge):
    plan = expand(spec())
    t = plan.spec.tune
    cfgs = tuning_configs(plan.waiting[0].cfg, t)
    c = choose(_summaries(tmp_path, cfgs, outcomes), "g", cfgs, t)
    assert c.ended and (c.value, c.edge) == (value, edge)


def test_no_choice_while_a_tuning_run_is_unfinished_or_when_none_finished(tmp_path):
    t = Tune({}, "lr", (0.001, 0.02, 0.2), 0, {"epochs": 1})
    cfgs = tuning_configs(expand(spec()).waiting[0].cfg, t)
    c = choose(_summaries(tmp_path / "a", cfgs[:2], [("completed", 0.3)] * 2), "g", cfgs, t)
    assert not c.ended and c.value is None  # the third has no summary: pending
    c = choose(_summaries(tmp_path / "b", cfgs, [("diverged", None)] * 2 + [("failed", None)]),
               "g", cfgs, t)
    assert c.impossible


def test_study_tunes_then_trains_every_seed_at_the_choice_and_resumes(tmp_path, capsys):
    out = tmp_path / "out"
    plan = expand(spec())
    counts = run_study(plan, out, tty=False, pack=False)
    assert counts == {"completed": 7} or sum(counts.values()) == 7
    log = capsys.readouterr().out
    assert "tuning lr for" in log and "chosen" in log
    doc = json.loads((out / "study.json").read_text())
    group = doc["tuning"]["groups"][0]
    store = Store(out)
    vals = {r["value"]: store.run(r["run_id"]).summary["val_acc"] for r in group["runs"]}
    best = max(vals, key=lambda v: vals[v])  # the choice, recomputed from the stored runs
    assert group["chosen"] == best
    tuned = [r for r in doc["runs"] if r["values"].get("norm") == "none"]
    assert len(tuned) == 2
    for r in tuned:
        cfg = store.run(r["run_id"]).config
        assert cfg["lr"] == best and cfg["epochs"] == 3
    assert doc["tuning"]["waiting"] == 0
    # resuming runs nothing again and keeps the choice
    again = run_study(expand(spec()), out, tty=False, pack=False)
    assert sum(again.values()) == 7
    assert "0 to run" in capsys.readouterr().out
    # ... and the estimate before it resumes finds the tuned runs under their chosen ids
    from bnlab.study.status import plan_estimate

    line, left = plan_estimate(expand(spec()), out, 1)
    assert left == 0 and "0 of 7 runs" in line, line


@pytest.mark.parametrize("table, expected", [
    ('axis = "lr"\nvalues = [0.1, 0.2]', "needs where"),
    ('where = { norm = "none" }\naxis = "seed"\nvalues = [1, 2]', "other than seed"),
    ('where = { norm = "none" }\naxis = "lr"\nvalues = [0.1]', "at least two different"),
    ('where = { norm = "none" }\naxis = "lr"\nvalues = [0.1, 0.1]', "at least two different"),
    ('where = { norm = "none" }\naxis = "lrr"\nvalues = [0.1, 0.2]', "unknown key 'lrr'"),
    ('where = { norm = "none" }\naxis = "lr"\nvalues = [0.1, 0.2]\nset = { lr = 1.0 }',
     "may not change"),
    ('where = { norm = "gn" }\naxis = "lr"\nvalues = [0.1, 0.2]', "matches no run"),
    ('where = { norm = "none" }\naxis = "lr"\nvalues = [0.1, 0.2]\nmode = 1', "unknown key"),
])
def test_tune_errors_are_one_line_exit_2(tmp_path, capsys, table, expected):
    text = SPEC.split("[tune]")[0] + "[tune]\n" + table + "\n"
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(text))
    rc = cli.main(["study", "run", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_tuning_needs_a_validation_split(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(SPEC).replace("val_fraction = 0.2\n", ""))
    rc = cli.main(["study", "run", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "val_fraction" in err and len(err.strip().splitlines()) == 1


def test_builtin_studies_with_a_tune_section_plan_their_tuning():
    plan = expand(load_spec("cifar10-cpu"))
    assert plan.spec.tune.axis == "lr" and len(plan.groups) == 1
    assert {r.cfg.seed for r in plan.tune_runs} == {0}
    assert {r.cfg.epochs for r in plan.tune_runs} == {2}
    assert len(plan.waiting) == len(plan.spec.grid["seed"]) == 3


def test_estimate_uses_the_folders_own_rates_and_leaves_out_finished_runs(tmp_path):
    """A study begun: its runs left are estimated at the rate its finished runs of the same
    network, norm, init, precision and batch measured (images over wall time), the others from
    the table; finished runs are not counted."""
    from bnlab.study import estimate as E
    from bnlab.study.status import plan_estimate, remaining

    spec = parse_spec({"name": "e", "base": {"dataset": "cifar10", "limit_train": 5000,
                                             "limit_test": 2000, "epochs": 4, "device": "cpu"},
                       "grid": {"norm": ["bn", "none"], "seed": [0, 1]}}, source="table")
    plan = expand(spec)
    per_run = 4 * (5000 + 2000 / 3)  # training-image equivalents of one run
    store = Store(tmp_path)
    done = next(r for r in plan.runs if r.cfg.norm == "bn" and r.cfg.seed == 0)
    store.run(done.run_id).write_json("summary.json", {
        "run_id": done.run_id, "status": "completed", "epochs_done": 4,
        "wall_time": per_run / 250.0})  # 250 images/s, measured here
    todo, own = remaining(plan, tmp_path)
    assert len(todo) == 3 and done.cfg not in todo
    assert own == {E.rate_key(done.cfg): pytest.approx(250.0)}
    est = E.estimate(todo, "cpu", None, own)
    # one BN run at the folder's own 250 images/s, two no-BN runs at the table's 1,050
    assert est.minutes == pytest.approx((per_run / 250 + 2 * per_run / 1050) / 60)
    line, left = plan_estimate(plan, tmp_path)
    assert left == 3 and "3 of 4 runs to train" in line and "own finished runs" in line
    # a diverged run says nothing of a whole run's cost
    store.run(done.run_id).write_json("summary.json", {
        "run_id": done.run_id, "status": "diverged", "epochs_done": 1, "wall_time": 1.0})
    assert remaining(plan, tmp_path)[1] == {}


def test_estimate_counts_probe_steps_and_the_measured_cpu_factors():
    """A probed run adds PROBE_STEP_COST training steps per probe step; on the CPU a bf16 run
    costs CPU_FACTORS['bf16'] and a Fixup run CPU_FACTORS['fixup'] of an fp32 BN run."""
    from bnlab.study import estimate as E

    spec = parse_spec({"name": "e", "base": {"dataset": "cifar10", "limit_train": 5000,
                                             "limit_test": 2000, "epochs": 4,
                                             "batch_size": 128},
                       "grid": {"seed": [0]}}, source="table")
    base = expand(spec).runs[0].cfg
    import dataclasses
    plain = 4 * (5000 + 2000 / 3)
    assert E.images(base, {}) == pytest.approx(plain)
    probed = dataclasses.replace(base, probe_every=10)
    steps = 4 * (5000 // 128)  # 156 steps: probes at 0, 10, ..., 150
    assert E.images(probed, {}) == pytest.approx(plain + (steps // 10 + 1) * 20 * 128)
    fixup_bf16 = dataclasses.replace(base, init="fixup", norm="none", precision="bf16")
    one = E.estimate([base], "cpu").minutes
    assert E.estimate([fixup_bf16], "cpu").minutes == pytest.approx(
        one * (926 / 1339) * (48.25 / 57.65))
    assert E.estimate([fixup_bf16], "gpu").minutes == pytest.approx(
        E.estimate([base], "gpu").minutes)  # the factors are the CPU's
