"""Statistics of the report against scipy, closed forms and published values; findings on
hand-made arms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from bnlab.report import stats as S
from bnlab.report.arms import Arm, _match_baselines
from bnlab.report.document import Table
from bnlab.report.findings import comparison_sentence, findings
from bnlab.report.load import Run, canon


# -- the t quantiles of the intervals ---------------------------------------------------------
def _half_width(n: int) -> float:
    """t_{0.975, n-1} as summarize's CI gives it: half-width / (s / sqrt(n))."""
    xs = [float(i % 2) for i in range(n)]  # any sample with spread
    s = S.summarize(xs)
    return (s.ci_high - s.mean) / (s.sd / math.sqrt(n))


@pytest.mark.parametrize("level", [0.5, 0.8, 0.95, 0.99])
def test_ci_quantiles_closed_forms_df1_df2(level):
    # df = 1 is the Cauchy distribution, t_p = tan(pi (p - 1/2)); df = 2 has
    # t_p = (2p - 1) / sqrt(2 p (1 - p))
    p = 0.5 + level / 2
    for n, ref in ((2, math.tan(math.pi * (p - 0.5))),
                   (3, (2 * p - 1) / math.sqrt(2 * p * (1 - p)))):
        xs = [0.25, 0.75, 0.5][:n]
        s = S.summarize(xs, level)
        half = (s.ci_high - s.ci_low) / 2
        assert half == pytest.approx(ref * s.sd / math.sqrt(n), rel=1e-12)


@pytest.mark.parametrize("df,value", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776),
                                      (5, 2.571), (10, 2.228), (20, 2.086), (30, 2.042)])
def test_t_975_quantiles_match_printed_table(df, value):
    assert round(_half_width(df + 1), 3) == value


# -- summaries ---------------------------------------------------------------------------------
def test_summarize_matches_numpy_and_scipy():
    xs = [0.912, 0.905, 0.921, 0.899]
    s = S.summarize(xs)
    assert s.n == 4
    assert s.mean == pytest.approx(np.mean(xs), rel=1e-15)
    assert s.sd == pytest.approx(np.std(xs, ddof=1), rel=1e-13)
    lo, hi = sps.t.interval(0.95, 3, loc=np.mean(xs), scale=sps.sem(xs))
    assert (s.ci_low, s.ci_high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))


def test_summarize_edge_cases():
    assert S.summarize([]) == S.Summary(0, None, None, None, None)
    assert S.summarize([0.7]) == S.Summary(1, 0.7, None, None, None)
    s = S.summarize([0.5, 0.5, 0.5])
    assert (s.mean, s.sd, s.ci_low, s.ci_high) == (0.5, 0.0, 0.5, 0.5)


# -- Welch -------------------------------------------------------------------------------------
def test_welch_published_example():
    # Welch's t-test, Wikipedia example 1: t = -2.46, df = 25.0, p = 0.021
    a = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    b = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    w = S.welch(a, b)
    assert round(w.t, 2) == -2.46 and round(w.df, 1) == 25.0 and round(w.p, 3) == 0.021
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert w.t == pytest.approx(ref.statistic, rel=1e-12)
    assert w.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert w.df == pytest.approx(ref.df, rel=1e-12)
    assert w.significant


@pytest.mark.parametrize("a,b", [([0.91, 0.93, 0.92], [0.88, 0.85, 0.90]),
                                 ([0.5, 0.52], [0.51, 0.49, 0.55, 0.50]),
                                 ([0.1, 0.9, 0.4], [0.45, 0.46, 0.44]),
                                 ([0.8, 0.8, 0.8], [0.7, 0.75, 0.72])])
@pytest.mark.filterwarnings("ignore:Precision loss")
def test_welch_matches_scipy_and_second_path(a, b):
    w = S.welch(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert w.p == pytest.approx(ref.pvalue, rel=1e-10)
    # CI of the difference from the Welch-Satterthwaite df, computed with numpy + scipy
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = sps.t.ppf(0.975, df) * se
    diff = np.mean(a) - np.mean(b)
    assert w.ci_low == pytest.approx(diff - half, rel=1e-9)
    assert w.ci_high == pytest.approx(diff + half, rel=1e-9)
    assert (w.ci_low < 0 < w.ci_high) == (w.p >= 0.05)


@pytest.mark.filterwarnings("ignore:Precision loss")
def test_welch_edge_cases():
    w = S.welch([0.9], [0.8, 0.82])
    assert w.diff == pytest.approx(0.09) and w.p is None and "n = 1" in w.reason
    w = S.welch([0.9, 0.9], [0.8, 0.8])
    assert w.p is None and "zero variance" in w.reason and not w.significant
    w = S.welch([], [0.8, 0.8])
    assert w.diff is None and w.p is None
    # zero variance on one side only is a valid test: df = n_other - 1
    w = S.welch([0.9, 0.9, 0.9], [0.8, 0.85, 0.83])
    assert w.df == pytest.approx(2.0) and w.p == pytest.approx(
        sps.ttest_ind([0.9, 0.9, 0.9], [0.8, 0.85, 0.83], equal_var=False).pvalue, rel=1e-10)


# -- bootstrap interval of a difference -------------------------------------------------------
def _bca_reference(a, b, level=0.95, resamples=40_000, seed=1):
    """BCa interval of mean(a) - mean(b) written from Efron & Tibshirani (1993), 14.3 and
    15.36: each arm resampled on its own; acceleration from each arm's jackknife."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, float), np.asarray(b, float)
    theta = a.mean() - b.mean()
    boot = (a[rng.integers(0, len(a), (resamples, len(a)))].mean(1)
            - b[rng.integers(0, len(b), (resamples, len(b)))].mean(1))
    z0 = sps.norm.ppf((np.sum(boot < theta) + np.sum(boot <= theta)) / 2 / resamples)
    num = den = 0.0
    for sample, sign in ((a, 1.0), (b, -1.0)):
        n = len(sample)
        loo = (sample.sum() - sample) / (n - 1)  # the jackknife means of this arm
        u = (n - 1) * (sign * loo.mean() - sign * loo)
        num += np.sum(u ** 3) / n ** 3
        den += np.sum(u ** 2) / n ** 2
    acc = num / den ** 1.5 / 6
    z = sps.norm.ppf([(1 - level) / 2, (1 + level) / 2])
    alphas = sps.norm.cdf(z0 + (z0 + z) / (1 - acc * (z0 + z)))
    return np.quantile(boot, alphas)


@pytest.mark.parametrize("a,b", [([0.91, 0.93, 0.92, 0.95, 0.90], [0.88, 0.85, 0.90, 0.87, 0.86]),
                                 ([0.5, 0.52, 0.49, 0.61, 0.55, 0.48, 0.47],
                                  [0.51, 0.49, 0.55, 0.50, 0.52, 0.80]),
                                 ([0.1, 0.9, 0.4, 0.3, 0.35, 0.2], [0.45, 0.46, 0.44, 0.45, 0.47])])
def test_bootstrap_matches_a_second_bca(a, b):
    low, high = S.bootstrap_diff(a, b)
    ref_low, ref_high = _bca_reference(a, b)
    width = ref_high - ref_low
    # Monte Carlo error of a 2.5% quantile of 10^4 resamples is ~1% of the width
    assert low == pytest.approx(ref_low, abs=0.05 * width)
    assert high == pytest.approx(ref_high, abs=0.05 * width)
    assert low < np.mean(a) - np.mean(b) < high


def test_bootstrap_agrees_with_welch_on_large_normal_samples():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.9, 0.01, 60), rng.normal(0.88, 0.02, 60)
    w = S.welch(a, b)
    half_t = (w.ci_high - w.ci_low) / 2
    assert (w.boot_low + w.boot_high) / 2 == pytest.approx(w.diff, abs=0.1 * half_t)
    assert (w.boot_high - w.boot_low) / 2 == pytest.approx(half_t, rel=0.1)


def test_bootstrap_needs_five_runs_and_some_spread():
    five, four = [0.9, 0.91, 0.92, 0.93, 0.94], [0.8, 0.81, 0.82, 0.83]
    assert S.bootstrap_diff(five, four) is None
    assert S.bootstrap_diff(five, four + [0.84]) is not None
    assert S.bootstrap_diff([0.5] * 5, [0.4] * 6) is None
    w = S.welch(five, four)
    assert w.p is not None and w.boot_low is None and w.boot_high is None
    # the report reads the same interval every time
    assert S.bootstrap_diff(five, four + [0.9]) == S.bootstrap_diff(five, four + [0.9])


# -- findings on hand-made arms ----------------------------------------------------------------
def _run(run_id, norm, seed, acc, status="completed", train_acc=None):
    return Run(run_id=run_id, values={"norm": norm, "seed": seed}, dataset="cifar10", seed=seed,
               status=status, config={"norm": norm, "seed": seed}, env=None, data=None,
               model=None, summary={"status": status, "test_acc": acc,
                                    "train_acc": train_acc or acc},
               metrics=[], probes=[], arm=(("norm", canon(norm)),))


def _arms(bn, none, none_status=None):
    runs_bn = [_run(f"b{i}", "bn", i, x) for i, x in enumerate(bn)]
    runs_none = [_run(f"n{i}", "none", i, x, (none_status or {}).get(i, "completed"))
                 for i, x in enumerate(none)]
    a = Arm("cifar10", (("norm", canon("bn")),), runs_bn, [])
    b = Arm("cifar10", (("norm", canon("none")),), runs_none, [])
    a.is_baseline = True
    _match_baselines([a, b], {"norm": "bn"})
    a.row, b.row = 1, 2
    return a, b


TABLE = Table(1, "summary", [], [])


def test_findings_significant_difference_phrased_by_sign():
    bn, none = [0.912, 0.915, 0.909], [0.895, 0.890, 0.898]
    _, b = _arms(bn, none)
    ref = sps.ttest_ind(none, bn, equal_var=False).pvalue
    text = comparison_sentence(b, TABLE)
    diff = 100 * (np.mean(bn) - np.mean(none))
    assert f"is lower than the baseline norm=bn by {diff:.2f} points" in text
    assert f"p = {ref:.3f}" in text and "n = 3 vs 3" in text
    assert "significant at α = 0.05" in text and "no significant" not in text
    assert text.endswith("(Table 1, rows 2 and 1).")


def test_findings_no_significant_difference():
    bn, none = [0.90, 0.93, 0.88], [0.91, 0.89, 0.935]
    _, b = _arms(bn, none)
    text = comparison_sentence(b, TABLE)
    ref = sps.ttest_ind(none, bn, equal_var=False).pvalue
    assert ref > 0.05
    assert "is higher than the baseline" in text
    assert "no significant difference at α = 0.05" in text


def test_findings_untestable_and_counted_statuses():
    a, b = _arms([0.91, 0.92], [0.5, float("nan"), 0.6],
                 none_status={1: "diverged", 2: "failed"})
    assert b.stats.n == 1 and b.count("diverged") == 1 and b.count("failed") == 1
    text = comparison_sentence(b, TABLE)
    assert "no Welch test is possible (n = 1 in an arm; n = 1 vs 2)" in text
    out = findings([a, b], TABLE)
    assert any(s.startswith("Of the 3 runs of norm=none on cifar10, 1 diverged, 1 failed")
               and s.endswith("(Table 1, row 2).") for s in out)
    assert any("The study has 5 runs: 3 completed, 1 diverged, 1 failed" in s for s in out)


def test_p_values_near_alpha_keep_their_side():
    from bnlab.report.fmt import pvalue

    assert pvalue(0.0496) == "0.0496" and pvalue(0.0503) == "0.0503"
    assert pvalue(0.012) == "0.012" and pvalue(0.0004) == "< 0.001" and pvalue(None) == "–"


def test_mean_and_sd_are_written_one_way_in_the_report_and_the_terminal():
    from bnlab.infer.compare_text import _ms
    from bnlab.report.fmt import mean_std

    ms = mean_std  # a stored spread (a dict) and a Summary are written by the same call

    accs = [0.5, 0.75]  # mean 0.625, sample sd 0.25 / sqrt(2)
    assert mean_std(S.summarize(accs)) == ms({"mean": 0.625, "sd": 0.17677669529663687}) == \
        "62.50 ± 17.68"
    assert mean_std(S.summarize([0.5])) == ms({"mean": 0.5, "sd": None, "n": 1}) == "50.00"
    assert mean_std(S.summarize([])) == ms(None) == "–" and _ms(None) == "-"
    assert _ms({"mean": 0.625, "sd": 0.125}) == "0.6250 ± 0.1250"


def test_labels_leave_out_axes_that_follow_from_earlier_ones():
    from bnlab.report.arms import label_axes

    def arm(norm, lr, warm):
        key = (("norm", canon(norm)), ("lr", canon(lr)), ("warmup_epochs", canon(warm)))
        return Arm("cifar10", key, [_run("r", norm, 0, 0.5)], [])

    # lr and warm-up set by a case for norm=none: determined by norm, so not named
    arms = [arm("bn", 0.1, 0.0), arm("none", 0.01, 2.0)]
    assert label_axes(arms, ["norm", "lr", "warmup_epochs"], []) == ("norm",)
    # several lr values for one norm: lr is needed, warm-up still follows
    arms.append(arm("none", 0.05, 2.0))
    assert label_axes(arms, ["norm", "lr", "warmup_epochs"], []) == ("norm", "lr")
    # a select_best axis is always named; the first axis always is
    assert label_axes(arms[:2], ["norm", "lr", "warmup_epochs"], ["lr"]) == ("norm", "lr")
    assert label_axes(arms[:1], ["norm", "lr"], []) == ("norm",)


def test_percentile_layer_is_the_deepest_leaf():
    from bnlab.report.probedata import percentile_layer

    # hooks fire in forward order: a norm's output before its enclosing block's output
    order = ["hidden.0.sigmoid", "hidden.0", "hidden.1.sigmoid", "hidden.1",
             "hidden.2.sigmoid", "hidden.2", ""]
    rows = [{"step": 0, "layer": x, "metric": "act_p50", "value": 0.0} for x in order]
    assert percentile_layer(rows) == "hidden.2.sigmoid"
    rows = [{"step": 0, "layer": x, "metric": "act_p50", "value": 0.0}
            for x in ["layer1.0", "layer1.0.bn1", "layer3.2.bn2", "layer3.2"]]
    assert percentile_layer(rows) == "layer3.2.bn2"
    assert percentile_layer([{"step": 0, "layer": "", "metric": "act_p50", "value": 0}]) is None


# -- selection on the validation split, grid edges, tuned arms, slow starts ---------------------
def _tuned_runs(lr, seed, test, val, status="completed"):
    key = (("norm", canon("none")), ("lr", canon(lr)))
    r = Run(run_id=f"n{lr}-{seed}", values={"norm": "none", "lr": lr, "seed": seed},
            dataset="cifar10", seed=seed, status=status,
            config={"norm": "none", "lr": lr, "seed": seed, "epochs": 8}, env=None, data=None,
            model=None, summary={"status": status, "test_acc": test, "val_acc": val},
            metrics=[], probes=[], arm=key)
    return key, r


def _tuned_arms(scores, on, statuses=None):
    """Arms of norm=none over lr, scores {lr: [(test, val), ...]}, selected on `on`;
    statuses {lr: {seed: status}} for runs that did not complete."""
    from bnlab.report.arms import _select

    arms = []
    for lr, pairs in scores.items():
        runs = [_tuned_runs(lr, s, t, v, (statuses or {}).get(lr, {}).get(s, "completed"))
                for s, (t, v) in enumerate(pairs)]
        arms.append(Arm("cifar10", runs[0][0], [r for _, r in runs], ["lr"]))
    _select(arms, ["lr"], on)
    return {a.value("lr"): a for a in arms}


def test_selection_follows_the_validation_split_not_the_test_set():
    scores = {0.01: [(0.80, 0.70), (0.82, 0.71)], 0.02: [(0.75, 0.78), (0.74, 0.77)],
              0.05: [(0.70, 0.60), (0.71, 0.61)]}
    by_val = _tuned_arms(scores, "val")
    assert [lr for lr, a in by_val.items() if a.selected] == [0.02]
    assert by_val[0.02].edges == []  # the middle of the grid
    assert by_val[0.02].val_stats.mean == pytest.approx(0.775)
    by_test = _tuned_arms(scores, "test")
    assert [lr for lr, a in by_test.items() if a.selected] == [0.01]


def test_a_selected_value_at_the_grid_edge_is_flagged_with_the_way_to_extend():
    arms = _tuned_arms({0.01: [(0.6, 0.6)], 0.02: [(0.7, 0.7)], 0.05: [(0.8, 0.8)]}, "val")
    best = arms[0.05]
    assert best.selected and [(e.axis, e.side, e.low, e.high) for e in best.edges] == [
        ("lr", "highest", 0.01, 0.05)]
    assert best.edges[0].extend == "upward"
    low = _tuned_arms({0.01: [(0.8, 0.8)], 0.02: [(0.7, 0.7)]}, "val")[0.01]
    assert low.edges[0].side == "lowest" and low.edges[0].extend == "downward"
    best.row, best.selection_row = 2, 3
    bn = Arm("cifar10", (("norm", canon("bn")),), [_run("b0", "bn", 0, 0.9)], [])
    bn.row = 1
    out = findings([bn, *arms.values()], TABLE, Table(2, "selection", [], []), on_val=True)
    edge = [s for s in out if "possibly under-tuned" in s]
    assert edge == ["On cifar10, for norm=none, the selected lr = 0.05 is the highest value "
                    "tried (0.01 to 0.05): the arm is possibly under-tuned; extend the grid "
                    "upward (Table 2, row 3)."]
    assert any("was tuned for norm=none only; norm=bn ran a single value" in s for s in out)
    assert any("not biased by the choice" in s for s in out)


def _selection_finding(arms, on_val=True):
    for i, a in enumerate(arms.values(), 1):
        a.selection_row = i
    out = findings(list(arms.values()), TABLE, Table(2, "selection", [], []), on_val=on_val)
    return next(s for s in out if "gave the highest mean" in s)


def test_a_higher_mean_passed_over_for_a_diverged_run_is_named_in_the_finding():
    """lr=0.05 has the highest mean validation accuracy of its finished runs (0.90, n = 1), but
    its other run diverged, so the choice is made among the other two values: the finding must
    not claim lr=0.02 was the highest among all three."""
    scores = {0.01: [(0.70, 0.70), (0.72, 0.72)], 0.02: [(0.80, 0.80), (0.82, 0.82)],
              0.05: [(0.90, 0.90), (0.10, 0.10)]}
    arms = _tuned_arms(scores, "val", {0.05: {1: "diverged"}})
    assert [lr for lr, a in arms.items() if a.selected] == [0.02]
    s = _selection_finding(arms)
    assert "among 3 values" not in s
    assert ("lr=0.02 gave the highest mean final validation accuracy among the 2 values (of 3) "
            "with a finished run and none diverged or failed (81.00%) (Table 2, row 2); lr=0.05 "
            "had a higher one (90.00%, n = 1) but was not eligible: of its 2 runs, 1 diverged "
            "(Table 2, row 3); its test accuracy") in s
    # a failed run of a lower value excludes it too, but there is nothing higher to name
    arms = _tuned_arms(scores | {0.05: [(0.5, 0.5), (0.5, 0.5)]}, "val", {0.05: {0: "failed"}})
    s = _selection_finding(arms)
    assert "among the 2 values (of 3) with a finished run and none diverged" in s
    assert "not eligible" not in s
    # one eligible value: said in the singular
    arms = _tuned_arms({0.01: [(0.7, 0.7)], 0.02: [(0.8, 0.8), (0.1, 0.1)]}, "val",
                       {0.02: {1: "failed"}})
    s = _selection_finding(arms)
    assert ("lr=0.01 gave the highest mean final validation accuracy as the only one of the 2 "
            "values with a finished run and none diverged or failed (70.00%)") in s
    assert "lr=0.02 had a higher one (80.00%, n = 1) but was not eligible: of its 2 runs, " \
        "1 failed" in s
    # every value eligible: among all of them
    s = _selection_finding(_tuned_arms({0.01: [(0.7, 0.7)], 0.02: [(0.8, 0.8)]}, "test"),
                           on_val=False)
    assert "lr=0.02 gave the highest mean final test accuracy among 2 values (80.00%)" in s
    # every value has a diverged run: chosen among all with a finished run, and said so
    arms = _tuned_arms({0.01: [(0.7, 0.7), (0.1, 0.1)], 0.02: [(0.8, 0.8), (0.1, 0.1)],
                        0.05: [(0.1, 0.1)]}, "val",
                       {0.01: {1: "diverged"}, 0.02: {1: "failed"}, 0.05: {0: "diverged"}})
    s = _selection_finding(arms)
    assert ("lr=0.02 gave the highest mean final validation accuracy among the 2 values (of 3) "
            "with a finished run, each of which had a run diverge or fail (80.00%)") in s


def test_a_slow_start_is_reported_but_the_run_counts_as_completed():
    def run(k, status="completed"):
        r = _run(f"s{k}", "none", k, 0.6, status)
        r.summary["at_chance_until_epoch"] = k
        r.config["epochs"] = 8  # quarter: 2 epochs
        return r

    assert run(3).slow_start == 3 and run(2).slow_start == 2
    assert run(1).slow_start is None  # a stall shorter than the first quarter
    assert run(8, "no_learning").slow_start is None  # never learned: that is the status
    a = Arm("cifar10", (("norm", canon("none")),), [run(3), run(1)], [])
    a.row = 1
    out = findings([a], TABLE)
    assert any("1 had a slow start (at chance until epoch 3, then learned)" in s for s in out)


def test_summary_table_shows_the_bootstrap_interval_from_five_runs():
    from pathlib import Path

    from bnlab.report.load import Study
    from bnlab.report.tables import summary_table

    def table(n):
        bn = [0.912, 0.915, 0.909, 0.918, 0.906, 0.911][:n]
        none = [0.895, 0.890, 0.898, 0.887, 0.901, 0.893][:n]
        a, b = _arms(bn, none)
        study = Study(Path("."), "s", "", {}, {}, {}, {}, ["norm", "seed"], {}, a.runs + b.runs)
        return summary_table(study, [a, b], 1), bn, none

    t4, _, _ = table(4)
    assert not any("bootstrap" in h for h in t4.head)
    t5, bn, none = table(5)
    assert t5.head[-1].startswith("Δ bootstrap 95% CI")
    low, high = _bca_reference(none, bn)
    cell = t5.rows[1][-1]  # row 2: norm=none against the baseline
    got = [float(x) for x in cell.strip("[]").split(", ")]
    assert got == pytest.approx([100 * low, 100 * high], abs=0.05 * 100 * (high - low) + 0.01)
    assert t5.rows[0][-1] == "–" and any("BCa" in n for n in t5.notes)


def test_summary_table_clips_an_accuracy_interval_at_0_and_100_percent():
    from pathlib import Path

    from bnlab.report.load import Study
    from bnlab.report.tables import summary_table

    # n = 2: t(0.975, 1) = 12.706; bn 0.97 ± 0.03 runs past 100%, none 0.08 ± 0.04 below 0%
    bn, none = [0.95, 0.99], [0.06, 0.10]
    a, b = _arms(bn, none)
    study = Study(Path("."), "s", "", {}, {}, {}, {}, ["norm", "seed"], {}, a.runs + b.runs)
    t = summary_table(study, [a, b], 1)
    col = t.head.index("95% CI (%)")
    half = [12.706204736 * np.std(x, ddof=1) / np.sqrt(2) for x in (bn, none)]
    assert 0.97 + half[0] > 1 and 0.08 - half[1] < 0  # the raw intervals do run past
    assert t.rows[0][col] == f"[{100 * (0.97 - half[0]):.2f}, 100.00]‡"
    assert t.rows[1][col] == f"[0.00, {100 * (0.08 + half[1]):.2f}]‡"
    assert sum("‡" in n and "cut at 0% or 100%" in n for n in t.notes) == 1
    # an interval inside the range is printed as computed, with no mark and no note
    a, b = _arms([0.900, 0.901], [0.500, 0.502])
    t = summary_table(study, [a, b], 1)
    assert "‡" not in t.rows[0][col] + t.rows[1][col]
    assert not any("‡" in n for n in t.notes)


def test_intro_names_the_arm_axes_and_sets_options_that_make_no_arm_apart():
    from pathlib import Path

    from bnlab.report.compose import _intro
    from bnlab.report.load import Study

    def intro(axes):
        return _intro(Study(Path("."), "s", "", {}, {}, {}, {}, axes, {}, []))

    text = intro(["dataset", "norm", "seed", "probe_every", "lr"])
    assert ("axes varied: norm, lr, seed (probe_every also differs between runs but leaves "
            "results unchanged and makes no arm).") in text
    text = intro(["norm", "probe_every", "seed", "compile"])
    assert ("axes varied: norm, seed (probe_every, compile also differ between runs but leave "
            "results unchanged and make no arm).") in text
    assert "axes varied: norm, seed. Each arm" in intro(["norm", "seed"])


def test_the_best_arm_is_not_praised_where_no_run_learned():
    def arms(statuses):
        runs = [_run(f"b{i}", "bn", i, x, "no_learning") for i, x in enumerate([0.07, 0.09])]
        a = Arm("cifar10", (("norm", canon("bn")),), runs, [])
        runs = [_run(f"n{i}", "none", i, x, st)
                for i, (x, st) in enumerate(zip([0.10, 0.12], statuses))]
        b = Arm("cifar10", (("norm", canon("none")),), runs, [])
        a.is_baseline = True
        _match_baselines([a, b], {"norm": "bn"})
        a.row, b.row = 1, 2
        return [a, b]

    out = findings(arms(["no_learning", "no_learning"]), TABLE)
    best = next(s for s in out if "highest mean final test accuracy" in s)
    assert best == ("On cifar10, the highest mean final test accuracy is 11.00% (norm=none, "
                    "n = 2) (Table 1, row 2), but no run on cifar10 learned (every final "
                    "accuracy at chance), so no arm does better than another.")
    # one run learned: the plain sentence
    out = findings(arms(["no_learning", "completed"]), TABLE)
    best = next(s for s in out if "highest mean" in s)
    assert best.endswith("(Table 1, row 2).")


def test_tuning_notes_name_the_dataset_where_an_arm_was_tuned_on_several(tmp_path):
    from bnlab.report.load import Study
    from bnlab.report.tuning import tuning_table
    from bnlab.store import Store

    store = Store(tmp_path)
    groups = []
    for ds in ("cifar10", "imagenet"):
        runs = []
        for lr in (0.005, 0.01):
            run_id = f"t-{ds}-{lr}"
            store.run(run_id).write_json("summary.json", {
                "status": "no_learning" if lr == 0.005 else "diverged", "val_acc": 0.15})
            runs.append({"run_id": run_id, "value": lr})
        groups.append({"dataset": ds, "values": {"norm": "none", "dataset": ds},
                       "runs": runs, "chosen": 0.005})

    def notes(groups):
        study = Study(tmp_path, "s", "", {}, {}, {}, {}, ["norm", "seed"], {}, [], store=store,
                      tuning={"axis": "lr", "groups": groups})
        return [n for n in tuning_table(study, 2).notes if "value tried" in n]

    assert notes(groups) == [
        f"norm=none on {ds}: 0.005 is the lowest value tried, so the arm may be under-tuned; "
        "extend the values downward." for ds in ("cifar10", "imagenet")]
    assert notes(groups[:1]) == ["norm=none: 0.005 is the lowest value tried, so the arm may be "
                                 "under-tuned; extend the values downward."]
