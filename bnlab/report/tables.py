"""The report's numbered tables, built from arms (arms.py) and stored analysis files.

Each builder records the row number it gave an item (arm.row, ...) so findings can cite it.
Accuracies are printed in percent, differences in percentage points.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bnlab.config import APPLIES
from bnlab.numbers import fmt_value
from bnlab.report import fmt
from bnlab.report.arms import INCLUDED, Arm
from bnlab.report.document import Table
from bnlab.report.load import Run, Study, number
from bnlab.report.probedata import PercentileDrift, percentile_drift, percentile_layer, series
from bnlab.report.references import Reference, arm_value, matches
from bnlab.report.stats import (
    ALPHA,
    BOOTSTRAP_MIN_N,
    BOOTSTRAP_RESAMPLES,
    Summary,
    summarize,
)

SELECTED_MARK = "†"
CLIPPED_MARK = "‡"
NO_TEST_MARKS = "ᵃᵇᶜᵈᵉ"  # one per reason a test is undefined (stats.welch has three)


def arm_label(a: Arm) -> str:
    return a.label + (f" {SELECTED_MARK}" if a.group_size > 1 else "")


def accuracy_interval(s: Summary) -> tuple[str, bool]:
    """The 95% CI of a mean accuracy as a cell, clipped to the possible range [0, 100]%
    (with 2-3 seeds t(0.975, n − 1) is large and mean ± t·s/√n can run past it); whether it
    was clipped (the cell then ends in CLIPPED_MARK)."""
    if s.ci_low is None or s.ci_high is None:
        return fmt.interval(None, None), False
    lo, hi = max(0.0, s.ci_low), min(1.0, s.ci_high)
    clipped = (lo, hi) != (s.ci_low, s.ci_high)
    return fmt.interval(lo, hi) + (CLIPPED_MARK if clipped else ""), clipped


def summary_table(study: Study, arms: list[Arm], number: int,
                  references: list[Reference] = ()) -> Table:
    shown = [a for a in arms if a.selected]
    cited = _published(shown, list(references))
    pending = any(a.pending for a in shown)
    head = ["Dataset", "Arm", "n", "Test acc. (%)", "95% CI (%)",
            "Δ vs baseline (points) [95% CI]", "p (Welch)", "Completed", "No learning",
            "Diverged", "Failed"]
    head += ["Pending"] if pending else []
    # a bootstrap interval exists where both arms have BOOTSTRAP_MIN_N runs (stats.welch)
    boot = any(a.welch is not None and a.welch.boot_low is not None for a in shown)
    head += ["Δ bootstrap 95% CI (points)"] if boot else []
    head += ["Published (%)"] if cited.column else []
    rows = []
    reasons: dict[str, str] = {}
    clipped_any = False
    for i, a in enumerate(shown, 1):
        a.row = i
        ci, clipped = accuracy_interval(a.stats)
        clipped_any |= clipped
        if a.is_baseline:
            delta, p = "baseline", fmt.DASH
        elif a.welch is None or a.welch.diff is None:
            delta, p = fmt.DASH, fmt.DASH
        else:
            w = a.welch
            delta = fmt.points(w.diff)
            if w.ci_low is not None:
                delta += " " + fmt.interval(w.ci_low, w.ci_high, sign=True)
            if w.p is not None:
                p = fmt.pvalue(w.p)
            else:
                mark = reasons.setdefault(w.reason, NO_TEST_MARKS[len(reasons)])
                p = f"{fmt.DASH}{mark}"
        row = [a.dataset, arm_label(a), str(a.stats.n), fmt.mean_std(a.stats), ci, delta, p,
               str(a.count("completed")), str(a.count("no_learning")),
               str(a.count("diverged")), str(a.count("failed"))]
        row += [str(a.pending)] if pending else []
        if boot:  # after the fixed columns, so those keep their places
            w = a.welch
            row.append(fmt.interval(w.boot_low, w.boot_high, sign=True) if w else fmt.DASH)
        row += [cited.column.get(id(a), fmt.DASH)] if cited.column else []
        rows.append(row)
    base = ", ".join(f"{k}={fmt_value(v)}" for k, v in study.baseline.items())
    notes = [
        "Test acc.: the test accuracy after the last epoch (not the best epoch), mean ± sample "
        "standard deviation (divisor n − 1) over seeds. n: runs included in the mean.",
        "Included are completed and no-learning runs (no learning: final test accuracy at or "
        "below chance + 3 binomial standard errors; such runs finished training). Diverged runs "
        "(non-finite loss) and failed runs (errors) are "
        "excluded from the mean, standard deviation, CI and test, and counted in their own "
        "columns." + (" Pending: runs not started, running, or interrupted (they resume)."
                      if pending else ""),
        "95% CI: mean ± t(0.975, n − 1) · s / √n. Δ: arm mean − baseline mean; its CI uses the "
        "Welch–Satterthwaite degrees of freedom; p: two-sided Welch's t-test, "
        f"α = {ALPHA:g}, not corrected for multiple comparisons.",
    ]
    if clipped_any:
        notes.append(f"{CLIPPED_MARK} The interval mean ± t · s / √n runs past the possible "
                     "range of an accuracy and is cut at 0% or 100%: with so few seeds, "
                     "t(0.975, n − 1) is large (12.7 for n = 2) and the interval says little.")
    if boot:
        notes.append(f"Δ bootstrap 95% CI: BCa interval of the difference of means from "
                     f"{BOOTSTRAP_RESAMPLES} resamples of the runs of each arm (fixed seed); "
                     f"given where both arms have at least {BOOTSTRAP_MIN_N} runs, and free "
                     "of the t-test's normality assumption.")
    if not any(a.is_baseline for a in shown):
        notes.append(f"No arm matches the baseline {base} (analysis.baseline), so no "
                     "differences are tested.")
    elif all(a.is_baseline for a in shown):
        notes.append(f"Every arm matches the baseline {base} (analysis.baseline), so no "
                     "differences are tested.")
    else:
        notes.append(f"Baseline arm: {base} (analysis.baseline); every other arm is compared "
                     "with the baseline arm of its dataset that shares its remaining values.")
    for reason, mark in reasons.items():
        notes.append(f"{mark} No Welch test: {reason}.")
    notes += cited.notes
    hidden = [ax for ax in study.arm_axes
              if shown and shown[0].label_axes is not None and ax not in shown[0].label_axes]
    if hidden:
        notes.append(f"Arm labels leave out {', '.join(hidden)}: their values follow from the "
                     "other axes (full values of every arm in the appendix).")
    for ax in dict.fromkeys(ax for a in shown for ax in a.not_applying):
        notes.append(f"Arm labels leave out {ax} where it does not apply: it changes a run only "
                     f"with {APPLIES[ax].words} (full values of every arm in the appendix).")
    if any(a.group_size > 1 for a in shown):
        axes = ", ".join(study.select_best)
        if study.select_on == "val":
            notes.append(f"{SELECTED_MARK} {axes} chosen among several values by the highest "
                         "mean final validation accuracy (images held out from the training "
                         "set; see the selection table); the test accuracy shown is that of the "
                         "chosen value, not biased by the choice.")
        else:
            notes.append(f"{SELECTED_MARK} {axes} chosen among several values by the highest "
                         "mean final test accuracy (see the selection table). The selection "
                         "uses the test set, which biases the selected arm's accuracy upward.")
    return Table(number, "Final test accuracy per dataset and arm", head, rows, notes,
                 numeric=[False, False] + [True] * (len(head) - 2), anchor="summary")


@dataclass
class _Cited:
    column: dict[int, str]  # id(arm) -> cell
    notes: list[str]


def _published(shown: list[Arm], references: list[Reference]) -> _Cited:
    """The Published column (a reference's value with its source's mark) and the notes naming
    each source; references that match no arm are named too."""
    column: dict[int, str] = {}
    notes: list[str] = []
    used: dict[str, int] = {}
    for ref in references:
        hits = [a for a in shown
                if matches(ref, a.dataset, lambda k, a=a: arm_value(k, a.value, a.runs))]
        if not hits:
            notes.append(f"A published number matched no arm of this study: "
                         f"{fmt.pct(ref.value)}% ({ref.citation}; for "
                         f"{', '.join(f'{k}={fmt_value(v)}' for k, v in ref.where.items())}).")
            continue
        mark = used.setdefault(ref.citation, len(used) + 1)
        for a in hits:
            cell = f"{fmt.pct(ref.value)} [{mark}]"
            column[id(a)] = f"{column[id(a)]}; {cell}" if id(a) in column else cell
    head = ["Published: the final test accuracy a paper reports for the same arm (1 − its test "
            "error), beside this study's measurement; the settings may differ (the note of "
            "each source says how)."] if used else []
    head += [f"[{mark}] {citation}." for citation, mark in used.items()]
    return _Cited(column, head + notes)


def selection_table(study: Study, arms: list[Arm], number: int) -> Table | None:
    if not study.select_best or all(a.group_size == 1 for a in arms):
        return None
    axes = study.select_best
    on_val = study.select_on == "val"
    head = ["Dataset", "Group", *axes, "n", *(["Val acc. (%)"] if on_val else []),
            "Test acc. (%)", "No learning", "Diverged", "Failed", "Selected"]
    rows, marked = [], []
    groups: dict[tuple, list[Arm]] = {}
    for a in arms:
        groups.setdefault((a.dataset, a.group), []).append(a)
    i = 0
    for members in groups.values():
        if len(members) == 1:
            continue
        for a in members:
            i += 1
            a.selection_row = i
            vals = [fmt_value(a.value(ax)) for ax in axes]
            mark = "selected" if a.selected else ""
            if a.edges:
                mark += " (at the grid's edge)"
            rows.append([a.dataset, a.group_label, *vals, str(a.stats.n),
                         *([fmt.mean_std(a.val_stats)] if on_val else []),
                         fmt.mean_std(a.stats), str(a.count("no_learning")),
                         str(a.count("diverged")), str(a.count("failed")), mark])
            marked.append(a.selected)
    split = "validation" if on_val else "test"
    notes = [
        f"Every value of {', '.join(axes)} tried per group, with the mean ± std over seeds of "
        f"its final {'validation and test' if on_val else 'test'} accuracy (diverged and "
        "failed runs excluded).",
        f"Selected: the value with the highest mean final {split} accuracy among values none "
        "of whose runs diverged or failed (among all values when each has such a run).",
        ("The validation images are held out from the training images (val_fraction, the same "
         "images for every run), so the selected value's test accuracy is not biased by the "
         "choice." if on_val else
         "The choice is made on the test set, so the selected arm's accuracy in the summary "
         "table is biased upward; an unbiased estimate needs a held-out validation split "
         "(val_fraction, with analysis.select_on = \"val\")."),
        "At the grid's edge: the selected value is the lowest or highest tried, so a better "
        "value may lie outside the grid (the arm is possibly under-tuned).",
    ]
    return Table(number, f"Selection of {', '.join(axes)} per group", head, rows, notes,
                 numeric=[False, False] + [True] * (len(head) - 3) + [False], marked=marked,
                 anchor="selection")


@dataclass
class GapRow:
    arm: Arm
    train: Summary
    test: Summary
    gap: Summary
    row: int = 0


def gap_table(study: Study, arms: list[Arm], number: int) -> tuple[Table | None, list[GapRow]]:
    if not {"dropout", "augment"} & set(study.axes):
        return None, []
    out = []
    for a in arms:
        if not a.selected:
            continue
        runs = [r for r in a.runs if r.final_train_acc is not None and r.status in
                INCLUDED and r.final_test_acc is not None]
        out.append(GapRow(a, summarize([r.final_train_acc for r in runs]),
                          summarize([r.final_test_acc for r in runs]), summarize(a.gaps)))
    head = ["Dataset", "Arm", "n", "Train acc. (%)", "Test acc. (%)", "Gap (points)",
            "95% CI of gap"]
    rows = []
    for i, g in enumerate(out, 1):
        g.row = i
        rows.append([g.arm.dataset, arm_label(g.arm), str(g.gap.n), fmt.mean_std(g.train),
                     fmt.mean_std(g.test), fmt.mean_std(g.gap),
                     fmt.interval(g.gap.ci_low, g.gap.ci_high)])
    notes = ["Gap: final-epoch train accuracy − final test accuracy per run, then mean ± std "
             "over seeds. The train accuracy is the running accuracy over the last epoch in "
             "training mode, i.e. on augmented images and with dropout active, as the network "
             "saw them; a larger gap means more overfitting.",
             "Runs included as in the summary table."]
    return (Table(number, "Train–test gap (overfitting)", head, rows, notes,
                  numeric=[False, False] + [True] * 5, anchor="gap"), out)


def diverged_at(run: Run) -> str:
    """'diverged at step N' (or after epoch E, when its test loss was non-finite)."""
    s = run.summary
    if "diverged_step" in s:
        return f"diverged at step {s['diverged_step']}"
    if "test_loss_nonfinite_epoch" in s:
        return f"diverged after epoch {s['test_loss_nonfinite_epoch']} (test loss non-finite)"
    return "diverged"


@dataclass
class ProbeRow:
    """One arm's percentile drift on `layer`: from its probed runs that did not diverge and
    recorded at least two probe steps (a drift needs two); `left_out` says why the others
    were left out."""

    arm: Arm
    layer: str
    drifts: list[PercentileDrift] = field(default_factory=list)
    row: int = 0
    left_out: list[str] = field(default_factory=list)  # "seed 0: diverged at step 2"

    @property
    def p50_change(self) -> Summary:
        return summarize([d.p50_change for d in self.drifts])

    @property
    def width_change(self) -> Summary:
        return summarize([d.width_change for d in self.drifts])

    @property
    def unit_change(self) -> Summary:
        return summarize([d.unit_abs_change for d in self.drifts
                          if d.unit_abs_change is not None])

    @property
    def window(self) -> int:
        return min((d.window for d in self.drifts), default=0)

    def mean_at(self, end: str, metric: str) -> float | None:
        vals = [getattr(d, end)[metric] for d in self.drifts]
        return sum(vals) / len(vals) if vals else None


def probe_rows(arms: list[Arm]) -> list[ProbeRow]:
    """A row per selected arm with percentile probes (with or without a drift)."""
    out = []
    for a in arms:
        if not a.selected:
            continue
        runs = [r for r in a.runs if r.probes]
        layer = next((x for x in (percentile_layer(r.probes) for r in runs) if x), None)
        if layer is None:
            continue
        row = ProbeRow(a, layer)
        for r in runs:
            d = percentile_drift(r, layer) if r.status != "diverged" else None
            if d is not None and d.last_step > d.first_step:
                row.drifts.append(d)
            else:
                probes = len(series(r.probes, layer, "act_p50")[0])
                why = diverged_at(r) + ", " if r.status == "diverged" else ""
                row.left_out.append(f"seed {fmt_value(r.seed)}: {why}{probes} probe step"
                                    f"{'s' if probes != 1 else ''}")
        out.append(row)
    return out


def probe_table(rows_in: list[ProbeRow], number: int) -> Table | None:
    if not rows_in:
        return None
    head = ["Dataset", "Arm", "Layer", "n", "Steps", "p15 first → last", "p50 first → last",
            "p85 first → last", "Δ p50", "Δ (p85 − p15)", "per unit |Δ p50|"]
    rows = []
    for i, p in enumerate(rows_in, 1):
        p.row = i
        steps = (f"{min(d.first_step for d in p.drifts)}–{max(d.last_step for d in p.drifts)}"
                 if p.drifts else fmt.DASH)
        cells = [f"{fmt.num(p.mean_at('first', m), 3)} → {fmt.num(p.mean_at('last', m), 3)}"
                 if p.drifts else fmt.DASH for m in ("act_p15", "act_p50", "act_p85")]
        unit = fmt.value_sd(p.unit_change) if p.unit_change.n else fmt.DASH
        rows.append([p.arm.dataset, arm_label(p.arm), p.layer, str(len(p.drifts)), steps,
                     *cells, fmt.signed_sd(p.p50_change),
                     fmt.signed_sd(p.width_change), unit])
    window = min((p.window for p in rows_in if p.drifts), default=0)
    notes = ["Percentiles of the layer's input activations pooled over all its units, as "
             "recorded by the probes on their fixed batch of held-out images (the same "
             "images at every step, in every arm and seed; runs recorded before the probes "
             "had one measured on each step's training batch). Ioffe & Szegedy 2015, "
             "Fig. 1(b, c) follows single units: see the per-unit figure.",
             f"first / last: mean over the first and over the last {window} recorded probes "
             "of a run (fewer in a short run: at most a quarter of its probes), averaged over "
             "the n seeds. Δ: last − first, mean ± std over seeds; Δ (p85 − p15): change of "
             "the spread; per unit |Δ p50|: the absolute change of the median of each "
             "followed unit, averaged over the run's units, mean ± std over seeds. Averaging "
             "the ends keeps probe-to-probe noise out of the drift (max − min over all probes "
             "would grow with it)."]
    left = [f"{arm_label(p.arm)}: {'; '.join(p.left_out)}" for p in rows_in if p.left_out]
    if left:
        notes.append("Runs without a drift (a diverged run's values are from before its loss "
                     "became non-finite; a drift needs two probe steps), left out of n: "
                     + "; ".join(left) + ".")
    return Table(number, "Input distribution of one layer over training", head, rows, notes,
                 numeric=[False, False, False] + [True] * 8, anchor="probes")


def runs_table(study: Study, arms: list[Arm], number: int) -> Table:
    arm_of = {id(r): a for a in arms for r in a.runs}
    head = ["Run", "Dataset", "Arm", "Seed", "Status", "Epochs", "Train acc. (%)",
            "Test acc. (%)", "Wall time (s)", "Note"]
    rows = []
    for r in study.runs:
        a = arm_of[id(r)]
        s = r.summary
        epochs = f"{s.get('epochs_done', 0)}/{(r.config or {}).get('epochs', '?')}"
        rows.append([r.run_id, r.dataset, a.label, fmt_value(r.seed), status_word(r.status),
                     epochs, fmt.pct(r.final_train_acc), fmt.pct(r.final_test_acc),
                     fmt.seconds(_n(s.get("wall_time"))), _note(r)])
    notes = ["Every run of the study in the order of study.json, with the status recorded in "
             "its summary.json. Accuracies are those of the last finished epoch; a diverged "
             "run's values are from before its loss became non-finite."]
    return Table(number, "All runs", head, rows, notes,
                 numeric=[False, False, False, True, False, True, True, True, True, False],
                 anchor="runs")


def status_word(status: str) -> str:
    """A run status as the report writes it: a run planned in study.json whose folder holds no
    config yet is "missing" in the store's terms but "not started" here, which says pending,
    not lost."""
    return "not started" if status == "missing" else status.replace("_", " ")


def _note(r: Run) -> str:
    s = r.summary
    if "diverged_step" in s:
        return f"loss non-finite at step {s['diverged_step']}"
    if "test_loss_nonfinite_epoch" in s:
        return f"test loss non-finite after epoch {s['test_loss_nonfinite_epoch']}"
    stall = r.slow_start
    if stall is not None:
        return f"slow start: at chance until epoch {stall}"
    if r.status == "no_learning":
        return "at chance at the end"
    if "no_learning_at_epoch" in s:  # the stall flag of earlier versions
        return f"at chance after epoch {s['no_learning_at_epoch']}"
    if s.get("error"):
        return str(s["error"])[:200]
    return ""


def _n(v):
    return number(v)
