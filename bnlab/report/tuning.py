"""The tuning table of a study with a [tune] section (bnlab.study.tuning): the values tried on
one seed at the short budget, each run's outcome on the validation split, and the value chosen
for every seed of the arm."""

from __future__ import annotations

from bnlab.numbers import fmt_value
from bnlab.report import fmt
from bnlab.report.arms import key_text, not_applying
from bnlab.report.document import Table
from bnlab.report.load import Study, canon, in_axis_order

CHOOSABLE = ("completed", "no_learning")


def tuning_table(study: Study, number: int) -> Table | None:
    tuning = study.tuning
    groups = tuning.get("groups") if isinstance(tuning, dict) else None
    if not groups or study.store is None:
        return None
    axis = str(tuning.get("axis", "value"))
    head = ["Dataset", "Arm", axis, "Status", "Val acc. (%)", "Chosen"]
    rows, marked, edges = [], [], []
    several = len({str(g.get("dataset", "")) for g in groups}) > 1
    labels = _labels(study, groups)
    for g, label in zip(groups, labels):
        # a note names the dataset where the arm was tuned on several (one note each)
        who = f"{label} on {g.get('dataset', '')}" if several else label
        tried = [r.get("value") for r in g.get("runs") or []]
        for r in g.get("runs") or []:
            s = study.store.run(str(r.get("run_id"))).summary or {}
            status = str(s.get("status", "pending"))
            val = s.get("val_acc")
            shown = fmt.pct(val) if status in CHOOSABLE and isinstance(val, int | float) else "–"
            chosen = g.get("chosen") is not None and r.get("value") == g.get("chosen")
            rows.append([str(g.get("dataset", "")), label, fmt_value(r.get("value")), status,
                         shown, "chosen" if chosen else ""])
            marked.append(chosen)
        c = g.get("chosen")
        nums = [v for v in tried if isinstance(v, int | float) and not isinstance(v, bool)]
        if c is not None and len(nums) == len(tried) > 1 and c in (min(nums), max(nums)):
            side = "lowest" if c == min(nums) else "highest"
            way = "downward" if side == "lowest" else "upward"
            edges.append(f"{who}: {fmt_value(c)} is the {side} value tried, so the arm may be "
                         f"under-tuned; extend the values {way}.")
        if c is None and int(tuning.get("waiting") or 0) == 0 and rows:
            edges.append(f"{who}: no value was chosen (no tuning run finished training), so "
                         "the arm was not run.")
    notes = [f"{tuning.get('protocol', axis + ' tuned')}: each value trained once, on seed "
             f"{tuning.get('seed', 0)}, at the short budget "
             f"({', '.join(f'{k} {v}' for k, v in (tuning.get('set') or {}).items()) or 'as set'}"
             "); the value with the highest final validation accuracy among the runs that "
             "finished training (a diverged or failed run is never chosen) is the arm's value "
             "for every seed at the full budget. The test split plays no part in the choice.",
             *edges]
    return Table(number, f"Tuning of {axis} on one seed at a short budget", head, rows, notes,
                 numeric=[False, False, True, False, True, False], marked=marked,
                 anchor="tuning")


def _labels(study: Study, groups: list[dict]) -> list[str]:
    """Each tuned group's values, as the arm labels give them: in the order of the study's axes,
    less a value that does not apply to the group (arms.not_applying)."""
    keys = [(str(g.get("dataset", "")),
             tuple((k, canon(v)) for k, v in in_axis_order(g.get("values") or {},
                                                            study.axes).items() if k != "dataset"))
            for g in groups]
    named = tuple(dict.fromkeys(a for _, key in keys for a, _ in key))
    drops = not_applying(keys, named, study.fixed)
    return [key_text(key, [a for a in named if a not in drops[(ds, key)]]) for ds, key in keys]
