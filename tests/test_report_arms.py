"""Arms as the report names them, on study folders planned from real specs (bnlab.study.expand)
and written to study.json, with no run trained: labels, the baseline note, pending arms."""

from __future__ import annotations

import itertools

from bnlab.config import from_mapping
from bnlab.report.arms import build_arms
from bnlab.report.load import load_study
from bnlab.report.records import run_records
from bnlab.report.tables import summary_table
from bnlab.report.tuning import tuning_table
from bnlab.store import Store
from bnlab.study.spec import expand, load_spec


def _planned(out, name: str, chosen=None):
    """OUT/study.json of built-in study `name`, every tuned group given the value `chosen`."""
    plan = expand(load_spec(name))
    if chosen is not None:
        plan = plan.with_choices({g.key: chosen for g in plan.groups})
    Store(out).write_meta("study.json", plan.study_json())
    return out


def test_arm_labels_leave_out_first_k_where_it_does_not_apply(tmp_path):
    out = _planned(tmp_path / "out", "placement", chosen=0.01)
    study = load_study(out)
    labels = [a.label for a in build_arms(study)]
    # first_k counts the blocks that keep their norms: only placement first_k with a norm has it
    assert labels == ["norm=bn, placement=post_conv", "norm=bn, placement=post_act",
                      "norm=bn, placement=first_k, first_k=1",
                      "norm=bn, placement=first_k, first_k=3",
                      "norm=bn, placement=first_k, first_k=6", "norm=none, placement=post_conv"]
    notes = summary_table(study, build_arms(study), 1).notes
    assert ("Arm labels leave out first_k where it does not apply: it changes a run only with "
            "placement first_k with a norm other than none (full values of every arm in the "
            "appendix).") in notes
    # the export's arm column is the report's label, run by run (3 seeds per arm)
    assert sorted(r["arm"] for r in run_records(out)) == sorted(labels * 3)
    # the tuning table names the tuned arm the same way
    rows = tuning_table(study, 1).rows
    assert {r[1] for r in rows} == {"norm=none, placement=post_conv, warmup_epochs=2"}


def test_labels_keep_a_value_that_does_not_apply_where_it_tells_two_arms_apart(tmp_path):
    # every placement with every first_k: the post_conv arms differ only in a first_k that does
    # not apply, but they are different runs and stay two arms with two labels
    out = tmp_path / "out"
    grid = list(itertools.product(["post_conv", "first_k"], [1, 3], [0, 1]))
    entries = [{"run_id": from_mapping({"placement": p, "first_k": k, "seed": s}).run_id(),
                "values": {"placement": p, "first_k": k, "seed": s}} for p, k, s in grid]
    Store(out).write_meta("study.json", {"name": "pk", "axes": ["placement", "first_k", "seed"],
                                         "analysis": {}, "runs": entries})
    arms = build_arms(load_study(out))
    assert [(a.label, len(a.runs)) for a in arms] == [
        ("placement=post_conv, first_k=1", 2), ("placement=post_conv, first_k=3", 2),
        ("placement=first_k, first_k=1", 2), ("placement=first_k, first_k=3", 2)]
    # norm none leaves every block without a norm: first_k does not apply, even under first_k
    entries = [{"run_id": from_mapping({"norm": n, "placement": "first_k", "first_k": k}).run_id(),
                "values": {"norm": n, "first_k": k}} for n, k in [("bn", 1), ("bn", 3),
                                                                   ("none", 1)]]
    Store(out).write_meta("study.json", {
        "name": "nk", "axes": ["norm", "first_k"], "analysis": {}, "runs": entries,
        "spec": {"base": {"placement": "first_k"}}})
    assert [a.label for a in build_arms(load_study(out))] == [
        "norm=bn, first_k=1", "norm=bn, first_k=3", "norm=none"]


def test_the_plans_value_of_an_option_no_axis_varies():
    from bnlab.report.load import planned_value

    spec = {"base": {"first-k": 3}, "grid": {"placement": ["first_k"], "norm": ["bn", "none"]},
            "cases": [{"where": {"norm": "none"}, "set": {"lr": 0.01}}]}
    assert planned_value("placement", spec, {}) == "first_k"  # a grid axis of one value
    assert planned_value("first_k", spec, {}) == 3  # [base], its key spelled with a dash
    assert planned_value("first_k", spec, {"first_k": 6}) == 6  # --set comes last
    assert planned_value("dropout", spec, {}) == 0.0 and planned_value("norm_options", {}, {}) == {}
    # a case sets it for some runs, a grid varies it: only the runs' configs tell
    assert planned_value("lr", spec, {}) is None and planned_value("norm", spec, {}) is None


def test_the_baseline_is_named_in_the_order_of_the_specs_axes(tmp_path):
    from bnlab.report.compose import _intro

    # imagenet's grid is norm, then batch_size; study.json stores its baseline table sorted
    out = _planned(tmp_path / "out", "imagenet")
    study = load_study(out)
    assert study.axes[:2] == ["norm", "batch_size"]
    arms = build_arms(study)
    assert arms[0].label == "norm=bn, batch_size=256" and arms[0].is_baseline
    assert ("Baseline arm: norm=bn, batch_size=256 (analysis.baseline); every other arm is "
            "compared with the baseline arm of its dataset that shares its remaining values."
            ) in summary_table(study, arms, 1).notes
    assert "the baseline arm is norm=bn, batch_size=256." in _intro(study)


def test_the_tuning_table_names_an_arm_in_the_order_of_the_axes(tmp_path):
    from bnlab.report.load import Study

    group = {"dataset": "cifar10", "values": {"dataset": "cifar10", "norm": "none",
                                              "placement": "post_act"},
             "runs": [{"run_id": "t1", "value": 0.01}], "chosen": None}
    study = Study(tmp_path, "s", "", {}, {}, {}, {}, ["placement", "norm", "seed"], {}, [],
                  store=Store(tmp_path), tuning={"axis": "lr", "groups": [group]})
    assert tuning_table(study, 1).rows[0][1] == "placement=post_act, norm=none"


def test_arms_whose_runs_are_pending_are_not_described_as_failed(tmp_path):
    from bnlab.report.findings import findings
    from bnlab.report.tables import runs_table

    # a study planned and not begun: every run in study.json, no run folder yet
    out = _planned(tmp_path / "out", "placement", chosen=0.01)
    study = load_study(out)
    arms = build_arms(study)
    summary, runs = summary_table(study, arms, 1), runs_table(study, arms, 2)
    assert {r[4] for r in runs.rows} == {"not started"}
    text = findings(arms, summary, runs=runs)
    assert text[0] == "The study has 18 runs: 18 not started (Table 2)."
    assert ("On cifar10, norm=bn, placement=post_act cannot be compared with the baseline "
            "norm=bn, placement=post_conv yet: norm=bn, placement=post_act is pending (0 of 3 "
            "runs finished); norm=bn, placement=post_conv is pending (0 of 3 runs finished) "
            "(Table 1, rows 2 and 1).") in text
    assert not any("failed" in s or "no finished" in s for s in text)


def test_an_arm_without_a_result_is_pending_or_ended_by_its_runs():
    from bnlab.report.arms import Arm, _match_baselines
    from bnlab.report.document import Table
    from bnlab.report.findings import findings
    from bnlab.report.load import Run, canon

    def arm(norm, statuses):
        runs = [Run(run_id=f"{norm}{i}", values={"norm": norm, "seed": i}, dataset="cifar10",
                    seed=i, status=st, config=None, env=None, data=None, model=None,
                    summary={"status": st, "test_acc": 0.9} if st == "completed" else {},
                    metrics=[], probes=[], arm=(("norm", canon(norm)),))
                for i, st in enumerate(statuses)]
        return Arm("cifar10", (("norm", canon(norm)),), runs, [])

    def sentence(statuses):
        base, other = arm("bn", ["completed"] * 3), arm("none", statuses)
        base.is_baseline, base.row, other.row = True, 1, 2
        _match_baselines([base, other], {"norm": "bn"})
        return [s for s in findings([base, other], Table(1, "summary", [], []))
                if "cannot be compared" in s]

    assert sentence(["diverged", "failed", "diverged"]) == [
        "On cifar10, norm=none cannot be compared with the baseline norm=bn: norm=none has no "
        "result (of its 3 runs, 2 diverged, 1 failed) (Table 1, rows 2 and 1)."]
    assert sentence(["diverged", "running", "missing"]) == [
        "On cifar10, norm=none cannot be compared with the baseline norm=bn yet: norm=none is "
        "pending (1 of 3 runs finished, 1 diverged) (Table 1, rows 2 and 1)."]
    assert sentence(["missing"]) == [
        "On cifar10, norm=none cannot be compared with the baseline norm=bn yet: norm=none is "
        "pending (0 of 1 run finished) (Table 1, rows 2 and 1)."]


def test_a_tuned_group_without_a_result_says_whether_its_runs_are_pending():
    from bnlab.report.arms import Arm, _select
    from bnlab.report.document import Table
    from bnlab.report.findings import findings
    from bnlab.report.load import Run, canon

    def arm(lr, statuses):
        key = (("norm", canon("bn")), ("lr", canon(lr)))
        runs = [Run(run_id=f"r{lr}-{i}", values={"norm": "bn", "lr": lr, "seed": i},
                    dataset="cifar10", seed=i, status=st, config=None, env=None, data=None,
                    model=None, summary={}, metrics=[], probes=[], arm=key)
                for i, st in enumerate(statuses)]
        return Arm("cifar10", key, runs, ["lr"])

    def sentence(*statuses):
        arms = [arm(lr, st) for lr, st in zip((0.1, 0.2), statuses)]
        _select(arms, ["lr"])
        for i, a in enumerate(arms, 1):
            a.selection_row = i
        return next(s for s in findings(arms, Table(1, "summary", [], []),
                                        Table(2, "selection", [], []))
                    if s.startswith("On cifar10, no value"))

    assert sentence(["missing", "running"], ["diverged", "missing"]) == (
        "On cifar10, no value of norm=bn has a result yet (3 of its 4 runs pending) "
        "(Table 2, row 1).")
    assert sentence(["failed", "diverged"], ["diverged", "diverged"]) == (
        "On cifar10, no value of norm=bn produced a finished run (Table 2, row 1).")


def test_a_started_run_is_running_while_its_lock_is_held_else_interrupted(tmp_path):
    """A run folder with a config and no final status: "running" while a process holds its
    lock, "interrupted" once none does (as `bnlab study status` and the exports say); either
    way its arm counts it as pending."""
    from bnlab.report.tables import runs_table

    out = _planned(tmp_path / "out", "quick")
    plan_run = expand(load_spec("quick")).runs[0]
    store = Store(out)
    store.run(plan_run.run_id).write_json("config.json", {"config": plan_run.cfg.to_dict(),
                                                          "env": None})

    def status_and_pending():
        study = load_study(out)
        arms = build_arms(study)
        run = next(r for r in study.runs if r.run_id == plan_run.run_id)
        arm = next(a for a in arms if run in a.runs)
        words = {row[0]: row[4] for row in runs_table(study, arms, 2).rows}
        return run.status, arm.pending, words.get(plan_run.run_id)

    assert status_and_pending() == ("interrupted", 3, "interrupted")
    with store.lock(plan_run.run_id):
        assert status_and_pending() == ("running", 3, "running")


def test_runs_that_wait_for_a_tuned_value_are_counted(tmp_path):
    """Before the tuning runs end, the tuned arm's runs are in no arm (their lr is not known):
    the first finding still counts them, and says what they wait for."""
    from bnlab.report.compose import _waiting
    from bnlab.report.findings import findings
    from bnlab.report.tables import runs_table

    out = _planned(tmp_path / "out", "placement")  # no value chosen yet
    plan = expand(load_spec("placement"))
    study = load_study(out)
    arms = build_arms(study)
    summary, runs = summary_table(study, arms, 1), runs_table(study, arms, 2)
    waiting = len(plan.waiting)
    assert waiting == 3 and _waiting(study) == (3, "lr")
    first = findings(arms, summary, runs=runs, waiting=_waiting(study))[0]
    # the tuning runs have their own table (and sentence): counted apart
    trained = len(plan.all_runs) - len(plan.tune_runs)
    assert first == (f"The study has {trained} runs: {trained - 3} not "
                     "started (Table 2); 3 more wait for their tuned lr, chosen when the tuning "
                     "runs have finished.")
