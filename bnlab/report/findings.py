"""The "Findings" section: sentences generated from the computed table rows, nothing else.

Every sentence states a measured number with its n and cites the table row it comes from.
Direction words ("higher", "lower") follow the sign of the measured difference and significance
words follow the Welch p-value at ALPHA; no conclusion is written in advance.
"""

from __future__ import annotations

from bnlab.numbers import fmt_value
from bnlab.report import fmt
from bnlab.report.arms import Arm, status_counts
from bnlab.report.compare_findings import compare_sentences
from bnlab.report.document import Table
from bnlab.report.stats import ALPHA
from bnlab.report.tables import GapRow, ProbeRow, arm_label, status_word


def cite(table: Table | None, *rows: int | None) -> str:
    if table is None:
        return ""
    rows = [r for r in rows if r is not None]
    if not rows:
        return f"({table.label})"
    if len(rows) == 1:
        return f"({table.label}, row {rows[0]})"
    listed = ", ".join(str(r) for r in rows[:-1]) + f" and {rows[-1]}"
    return f"({table.label}, rows {listed})"


def _statuses(a: Arm) -> str | None:
    parts = []
    for status, verb in (("diverged", "diverged"), ("failed", "failed"),
                         ("no_learning", "did not learn (final accuracy at chance)")):
        k = a.count(status)
        if k:
            parts.append(f"{k} {verb}")
    slow = [r.slow_start for r in a.runs if r.slow_start is not None]
    if slow:
        parts.append(f"{len(slow)} had a slow start (at chance until epoch "
                     f"{', '.join(str(k) for k in slow)}, then learned)")
    if not parts:
        return None
    total = len(a.runs)
    pending = f" ({a.pending} pending)" if a.pending else ""
    return (f"of the {total} run{'s' if total != 1 else ''}{pending} of {a.label} on "
            f"{a.dataset}, " + ", ".join(parts))


def no_result(a: Arm) -> str:
    """Why arm `a` has no accuracy to average, in words that keep a study still running apart
    from runs that ended without a result: its runs are pending (planned in study.json, not
    started or not finished), or every one diverged or failed."""
    total = len(a.runs)
    ended = ", ".join(f"{k} {s}" for s in ("diverged", "failed") if (k := a.count(s)))
    if a.pending:
        return (f"{a.label} is pending ({total - a.pending} of {total} "
                f"run{'s' if total != 1 else ''} finished" + (f", {ended})" if ended else ")"))
    return f"{a.label} has no result (of its {total} run{'s' if total != 1 else ''}, " + (
        f"{ended})" if ended else "none recorded a final test accuracy)")


def comparison_sentence(a: Arm, summary: Table) -> str | None:
    w, b = a.welch, a.baseline
    if b is None or w is None:
        return None
    where = cite(summary, a.row, b.row)
    if w.diff is None:
        empty = [x for x in (a, b) if x.stats.n == 0]
        # "yet" only where every arm without a result may still get one
        yet = " yet" if all(x.pending for x in empty) else ""
        return (f"On {a.dataset}, {a.label} cannot be compared with the baseline {b.label}"
                f"{yet}: {'; '.join(no_result(x) for x in empty)} {where}.")
    if w.p is None:
        return (f"On {a.dataset}, {a.label} differs from the baseline {b.label} by "
                f"{fmt.points(w.diff)} points, but no Welch test is possible ({w.reason}; "
                f"n = {w.n_a} vs {w.n_b}) {where}.")
    if w.diff == 0:
        direction = f"has the same mean as the baseline {b.label}"
    else:
        word = "higher" if w.diff > 0 else "lower"
        direction = (f"is {word} than the baseline {b.label} by "
                     f"{fmt.points(w.diff, sign=False)} points")
    verdict = (f"significant at α = {ALPHA:g}" if w.significant
               else f"no significant difference at α = {ALPHA:g}")
    return (f"On {a.dataset}, {arm_label(a)} {direction} ({fmt.p_phrase(w.p)}, n = {w.n_a} vs "
            f"{w.n_b}; 95% CI of the difference {fmt.interval(w.ci_low, w.ci_high, sign=True)}"
            f" points): {verdict} {where}.")


def findings(arms: list[Arm], summary: Table, selection: Table | None = None,
             gap: Table | None = None, gap_rows: list[GapRow] = (),
             probe: Table | None = None, probe_rows: list[ProbeRow] = (),
             compared: list[tuple[dict, list[Table], str | None]] = (),
             runs: Table | None = None, on_val: bool = False,
             waiting: tuple[int, str] = (0, "")) -> list[str]:
    """The report's sentences; `compared` holds each stored comparison as (compare.json,
    its tables, its dataset); `on_val`: tuned values were selected on the validation split;
    `waiting`: (runs that wait for a tuned value, in no arm yet; the tuned axis)."""
    out = []
    counts = status_counts(arms)
    total = sum(counts.values())
    n_wait, axis = waiting
    later = (f"; {n_wait} more wait for their tuned {axis or 'value'}, chosen when the tuning "
             "runs have finished" if n_wait else "")
    if total:
        listed = ", ".join(f"{k} {status_word(s)}" for s, k in counts.items())
        out.append(f"The study has {total + n_wait} runs: {listed} {cite(runs)}{later}.")
    shown = [a for a in arms if a.selected]
    for ds in dict.fromkeys(a.dataset for a in shown):
        here = [a for a in shown if a.dataset == ds and a.stats.n > 0]
        if len(here) > 1:
            best = max(here, key=lambda a: a.stats.mean)
            # where no included run learned, the highest mean is the luckiest chance level
            none_learned = all(a.count("no_learning") == a.stats.n for a in here)
            out.append(f"On {ds}, the highest mean final test accuracy is "
                       f"{fmt.pct(best.stats.mean)}% ({arm_label(best)}, n = {best.stats.n}) "
                       f"{cite(summary, best.row)}" + (
                           f", but no run on {ds} learned (every final accuracy at chance), so "
                           "no arm does better than another." if none_learned else "."))
        elif here:
            a = here[0]
            out.append(f"On {ds}, {arm_label(a)} reaches {fmt.mean_std(a.stats)}% "
                       f"(n = {a.stats.n}) {cite(summary, a.row)}.")
        for a in shown:
            if a.dataset == ds and not a.is_baseline:
                s = comparison_sentence(a, summary)
                if s:
                    out.append(s)
    for a in arms:
        text = _statuses(a)
        if text is None:
            continue
        where = cite(summary, a.row) if a.selected else cite(selection, a.selection_row)
        out.append(text[0].upper() + text[1:] + f" {where}.")
    if selection is not None:
        out += _selection_sentences(arms, summary, selection, on_val)
    out += _gap_sentences(gap, list(gap_rows))
    out += _probe_sentences(probe, list(probe_rows))
    for compare, tables, dataset in compared:
        out += compare_sentences(compare, list(tables), dataset)
    return out


def _selection_sentences(arms: list[Arm], summary: Table, selection: Table,
                         on_val: bool) -> list[str]:
    """Which value each tuned arm chose and on what split, edges of the grid, and which arms
    were not tuned at all."""
    out = []
    split = "validation" if on_val else "test"
    for a in arms:
        if not (a.selected and a.group_size > 1 and a.selection_row is not None):
            continue
        where = cite(selection, a.selection_row)
        if a.no_result_in_group:
            group = [m for m in arms if m.dataset == a.dataset and m.group == a.group]
            pending = sum(m.pending for m in group)
            total = sum(len(m.runs) for m in group)
            out.append(f"On {a.dataset}, no value of {a.group_label} has a result yet "
                       f"({pending} of its {total} runs pending) {where}." if pending else
                       f"On {a.dataset}, no value of {a.group_label} produced a finished run "
                       f"{where}.")
            continue
        chosen = a.val_stats if on_val else a.stats
        text = (f"On {a.dataset}, for {a.group_label}, {a.selection_label} gave the highest "
                f"mean final {split} accuracy {_among(a)} ({fmt.pct(chosen.mean)}%) {where}; ")
        for m in a.passed_over:
            score = m.val_stats if on_val else m.stats
            text += (f"{m.selection_label} had a higher one ({fmt.pct(score.mean)}%, "
                     f"n = {score.n}) but was not eligible: {_unstable(m)} "
                     f"{cite(selection, m.selection_row)}; ")
        if on_val:
            text += (f"its test accuracy, {fmt.pct(a.stats.mean)}%, is not biased by the "
                     "choice (the validation images are held out from the training set).")
        else:
            text += (f"this choice uses the test set, so that arm's accuracy in {summary.label} "
                     "is biased upward.")
        out.append(text)
        for e in a.edges:
            out.append(f"On {a.dataset}, for {a.group_label}, the selected {e.axis} = "
                       f"{fmt_value(e.value)} is the {e.side} value tried ({fmt_value(e.low)} to "
                       f"{fmt_value(e.high)}): the arm is possibly under-tuned; extend the grid "
                       f"{e.extend} {where}.")
    shown = [a for a in arms if a.selected]
    for ds in dict.fromkeys(a.dataset for a in shown):
        tuned = [a for a in shown if a.dataset == ds and a.group_size > 1]
        fixed = [a for a in shown if a.dataset == ds and a.group_size == 1]
        if tuned and fixed:
            axes = ", ".join(dict.fromkeys(ax for a in tuned for ax in a.select_axes))
            out.append(f"On {ds}, {axes} was tuned for {_listing([a.group_label for a in tuned])}"
                       f" only; {_listing([a.label for a in fixed])} ran a single value "
                       f"{cite(summary, *(a.row for a in fixed))}.")
    return out


def _among(a: Arm) -> str:
    """Which values of its group the selected arm was chosen among (arms._select): all of
    them, or those with a finished run and none diverged or failed."""
    if a.pool_size == a.group_size:
        return f"among {a.group_size} values"
    which = ("with a finished run and none diverged or failed" if a.pool_stable else
             "with a finished run, each of which had a run diverge or fail")
    if a.pool_size == 1:
        return f"as the only one of the {a.group_size} values {which}"
    return f"among the {a.pool_size} values (of {a.group_size}) {which}"


def _unstable(a: Arm) -> str:
    total = len(a.runs)
    parts = [f"{a.count(s)} {s}" for s in ("diverged", "failed") if a.count(s)]
    return f"of its {total} run{'s' if total != 1 else ''}, {' and '.join(parts)}"


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


def _gap_sentences(gap: Table | None, rows: list[GapRow]) -> list[str]:
    out = []
    for ds in dict.fromkeys(g.arm.dataset for g in rows):
        here = [g for g in rows if g.arm.dataset == ds and g.gap.mean is not None]
        if len(here) < 2:
            continue
        hi = max(here, key=lambda g: g.gap.mean)
        lo = min(here, key=lambda g: g.gap.mean)
        out.append(f"On {ds}, the train–test gap (train minus test accuracy) is largest for "
                   f"{arm_label(hi.arm)} ({fmt.points(hi.gap.mean)} points, n = {hi.gap.n}) "
                   f"and smallest for {arm_label(lo.arm)} ({fmt.points(lo.gap.mean)} points, "
                   f"n = {lo.gap.n}) {cite(gap, hi.row, lo.row)}.")
    return out


def _probe_sentences(probe: Table | None, rows: list[ProbeRow]) -> list[str]:
    out = []
    for ds in dict.fromkeys(p.arm.dataset for p in rows):
        here = sorted((p for p in rows if p.arm.dataset == ds and p.drifts),
                      key=lambda p: abs(p.p50_change.mean or 0.0), reverse=True)
        none = [p for p in rows if p.arm.dataset == ds and not p.drifts]
        parts = []
        for p in here:
            part = (f"{fmt.signed_sd(p.p50_change)} in {p.arm.label} (spread p85 − p15 "
                    f"{fmt.signed_sd(p.width_change)}")
            if p.unit_change.n:
                part += f"; a single unit's median {fmt.value_sd(p.unit_change)} either way"
            parts.append(part + f"; n = {p.p50_change.n})")
        gaps = "; ".join(f"{p.arm.label} has none ({'; '.join(p.left_out)})" for p in none)
        if not here:
            out.append(f"On {ds}, no arm has a drift of its input percentiles (a drift needs "
                       f"two probe steps of a run that did not diverge): {gaps} "
                       f"{cite(probe, *(p.row for p in none))}.")
            continue
        layer, k = here[0].layer, min(p.window for p in here)
        ends = ("from the first probe to the last" if k == 1 else
                f"from the mean of the first {k} probes to the mean of the last {k}")
        out.append(f"On {ds}, {ends}, the median of the input of layer {layer} (pooled over "
                   f"its units, on the probes' fixed batch) moves by {'; '.join(parts)}"
                   + (f"; {gaps}" if gaps else "")
                   + f" {cite(probe, *(p.row for p in here + none))}.")
    return out
