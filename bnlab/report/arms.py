"""Arms of a study: runs grouped by dataset and variant, the select_best choice, the baseline.

An arm is every run of one dataset that shares the values of all varying axes except `seed`.
Its accuracy statistics use the runs that finished training with a final test accuracy
(INCLUDED: completed and no_learning); diverged and failed runs are counted, not averaged: a
diverged run's last accuracy is from before its loss became non-finite, and a failed run is a
crash, not an outcome of the method.

select_best: arms that differ only in the select_best axes form a group; the arm with the highest
mean final accuracy on the selection split is selected, among the arms of the group with no
diverged or failed run (among all arms of the group if every one has such a run). The selection
split is the held-out validation split (analysis.select_on = "val", the default of specs), so the
selected arm's test accuracy is not biased by the choice; with select_on = "test" it is, and the
report says so. A numeric value selected at the lowest or highest end of the values tried is an
`edge`: the arm may be under-tuned, and the report says which way to extend the grid.

Labels: an arm is labelled by its values of the varying axes, less an axis whose value follows
from the axes before it (label_axes) and an axis whose value does not apply to the arm, like
first_k on an arm without placement first_k (config.applies; not_applying).

Baseline: an arm is a baseline arm when its values match analysis.baseline (default norm=bn).
Every other selected arm is compared with the selected baseline arm of its dataset that has the
same values on the remaining axes (ignoring the baseline keys and the select_best axes); when no
such arm exists but the dataset has exactly one baseline arm, with that one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bnlab.config import applies
from bnlab.numbers import fmt_value
from bnlab.report.load import STATUS_ORDER, Run, Study, same
from bnlab.report.stats import Summary, Welch, summarize, welch

INCLUDED = ("completed", "no_learning")


@dataclass(frozen=True)
class Edge:
    """A selected value at an end of the values tried: `side` is 'lowest' or 'highest'."""

    axis: str
    value: float
    side: str
    low: float
    high: float

    @property
    def extend(self) -> str:
        return "downward" if self.side == "lowest" else "upward"


@dataclass(eq=False)
class Arm:
    dataset: str
    key: tuple[tuple[str, str], ...]
    runs: list[Run]
    select_axes: list[str]
    stats: Summary = field(init=False)
    val_stats: Summary = field(init=False)  # final validation accuracy (runs with val_fraction)
    accs: list[float] = field(init=False)
    counts: Counter = field(init=False)
    selected: bool = True
    group_size: int = 1
    pool_size: int = 1  # values of the group the choice was made among (see _select)
    pool_stable: bool = True  # the pool excluded the values with a diverged or failed run
    # values with a higher mean on the selection split that were not eligible (a run of theirs
    # diverged or failed): a finding names them so "highest" is not read as over all values
    passed_over: list[Arm] = field(default_factory=list)
    no_result_in_group: bool = False
    is_baseline: bool = False
    baseline: Arm | None = None
    welch: Welch | None = None
    label_axes: tuple[str, ...] | None = None  # axes named in labels (None: all; label_axes())
    # of those, the axes whose value does not apply to this arm (not_applying), left out of its
    # labels: first_k=1 on an arm without placement first_k tells nothing
    not_applying: tuple[str, ...] = ()
    row: int | None = None  # row in the summary table
    selection_row: int | None = None
    edges: list[Edge] = field(default_factory=list)  # selected values at an end of the grid
    tried: dict[str, list] = field(default_factory=dict)  # select axis -> values of the group

    def __post_init__(self):
        self.accs = [r.final_test_acc for r in self.runs
                     if r.status in INCLUDED and r.final_test_acc is not None]
        self.stats = summarize(self.accs)
        self.val_stats = summarize([r.final_val_acc for r in self.runs
                                    if r.status in INCLUDED and r.final_val_acc is not None])
        self.counts = Counter(r.status for r in self.runs)

    def value(self, axis: str):
        """The arm's value of an axis, or of an option no axis varies: the first run's that
        has it (a run not started yet has no stored config to read it from)."""
        if axis in dict(self.key):
            return json.loads(dict(self.key)[axis])
        return next((v for r in self.runs if (v := r.value(axis)) is not None), None)

    @property
    def named(self) -> tuple[str, ...]:
        """The axes this arm's labels name."""
        named = dict(self.key) if self.label_axes is None else self.label_axes
        return tuple(a for a in named if a not in self.not_applying)

    def _text(self, keep) -> str:
        return key_text(self.key, [a for a in self.named if keep(a)])

    @property
    def label(self) -> str:
        return key_label(self.key, self.named)

    @property
    def full_label(self) -> str:
        return key_label(self.key, None)

    @property
    def group_label(self) -> str:
        return self._text(lambda a: a not in self.select_axes) or "all runs"

    @property
    def selection_label(self) -> str:
        return ", ".join(f"{a}={fmt_value(json.loads(v))}" for a, v in self.key
                         if a in self.select_axes)

    @property
    def group(self) -> tuple:
        return tuple((a, v) for a, v in self.key if a not in self.select_axes)

    def count(self, *statuses: str) -> int:
        return sum(self.counts.get(s, 0) for s in statuses)

    @property
    def unstable(self) -> int:
        return self.count("diverged", "failed")

    @property
    def pending(self) -> int:
        return self.count("running", "interrupted", "missing")

    @property
    def gaps(self) -> list[float]:
        """Per run: final-epoch train accuracy minus final test accuracy."""
        return [r.final_train_acc - r.final_test_acc for r in self.runs
                if r.status in INCLUDED and r.final_train_acc is not None
                and r.final_test_acc is not None]


def build_arms(study: Study) -> list[Arm]:
    """All arms, per dataset in order of appearance; baseline arms first within a dataset."""
    by_key: dict[tuple, list[Run]] = {}
    for r in study.runs:
        by_key.setdefault((r.dataset, r.arm), []).append(r)
    arms = [Arm(ds, key, runs, study.select_best) for (ds, key), runs in by_key.items()]
    named = label_axes(arms, study.arm_axes, study.select_best)
    drops = not_applying([(a.dataset, a.key) for a in arms], named, study.fixed)
    for a in arms:
        a.label_axes = named
        a.not_applying = drops[(a.dataset, a.key)]
    base = study.baseline
    for a in arms:
        a.is_baseline = all(same(a.value(k), v) for k, v in base.items())
    _select(arms, study.select_best, study.select_on)
    _match_baselines(arms, base)
    order = {ds: i for i, ds in enumerate(study.datasets)}
    return sorted(arms, key=lambda a: (order[a.dataset], not a.is_baseline))


def key_text(key: tuple[tuple[str, str], ...], named) -> str:
    return ", ".join(f"{a}={fmt_value(json.loads(v))}" for a, v in key if a in named)


def key_label(key: tuple[tuple[str, str], ...], named: tuple[str, ...] | None) -> str:
    """An arm's label: its values of the `named` axes (None: all), "all runs" for none."""
    return key_text(key, dict(key) if named is None else named) or "all runs"


def label_axes(arms: list[Arm], axes: list[str], keep: list[str]) -> tuple[str, ...]:
    """The axes that labels name: an axis is left out when its value follows from the axes
    before it (like an lr that a case sets for norm=none; the runner lists grid axes first).
    `keep` axes are always named."""
    return named_axes([(a.dataset, a.key) for a in arms], axes, keep)


def named_axes(keys: list[tuple[str, tuple]], axes: list[str],
               keep: list[str]) -> tuple[str, ...]:
    """label_axes of arms given as (dataset, key): for exports, which have no Arm objects."""
    named = []
    for i, ax in enumerate(axes):
        seen: dict[tuple, set] = {}
        for dataset, key in keys:
            k = dict(key)
            seen.setdefault((dataset, *(k.get(x) for x in axes[:i])), set()).add(k.get(ax))
        if ax in keep or i == 0 or any(len(v) > 1 for v in seen.values()):
            named.append(ax)
    return tuple(named)


def not_applying(keys: list[tuple[str, tuple]], named: tuple[str, ...],
                 fixed: Callable[[str], Any]) -> dict[tuple[str, tuple], tuple[str, ...]]:
    """Per arm, given as (dataset, key): the `named` axes whose value does not apply to it by
    config.applies, reading the arm's own values and, for an option no axis varies, fixed(name),
    the study's one value. Where leaving them out would give two arms of a dataset one label,
    those arms keep every value: a label must still tell its arm apart (their runs are
    different runs, each with its own seeds, and are not pooled)."""
    cache: dict[str, Any] = {}

    def study_value(k: str) -> Any:
        if k not in cache:
            cache[k] = fixed(k)
        return cache[k]

    out = {}
    for dataset, key in dict.fromkeys(keys):
        own = dict(key)

        def value(k, own=own):
            return json.loads(own[k]) if k in own else study_value(k)

        out[(dataset, key)] = tuple(a for a in named if a in own and not applies(a, value))

    def label(arm: tuple[str, tuple], drop: tuple[str, ...]) -> tuple[str, str]:
        return arm[0], key_text(arm[1], [a for a in named if a not in drop])

    shown = Counter(label(arm, drop) for arm, drop in out.items())
    return {arm: drop if shown[label(arm, drop)] == 1 else () for arm, drop in out.items()}


def _select(arms: list[Arm], select_axes: list[str], on: str = "test") -> None:
    if not select_axes:
        return
    groups: dict[tuple, list[Arm]] = {}
    for a in arms:
        groups.setdefault((a.dataset, a.group), []).append(a)
    for members in groups.values():
        score = (lambda a: a.val_stats) if on == "val" else (lambda a: a.stats)
        with_result = [a for a in members if score(a).n > 0]
        stable = [a for a in with_result if a.unstable == 0]
        pool = stable or with_result
        best = max(pool, key=lambda a: score(a).mean) if pool else members[0]
        for a in members:
            a.selected = a is best
            a.group_size = len(members)
            a.pool_size = len(pool)
            a.pool_stable = bool(stable)
            a.no_result_in_group = not pool
            a.tried = {ax: [m.value(ax) for m in members] for ax in select_axes}
        if pool and len(members) > 1:
            best.edges = _edges(best, select_axes)
            best.passed_over = [a for a in with_result if a not in pool
                                and score(a).mean > score(best).mean]


def _edges(best: Arm, select_axes: list[str]) -> list[Edge]:
    """The numeric select axes whose selected value is the lowest or highest tried."""
    out = []
    for ax in select_axes:
        values = [v for v in best.tried[ax]
                  if isinstance(v, int | float) and not isinstance(v, bool)]
        v = best.value(ax)
        if len(set(values)) < 2 or v not in values:
            continue
        lo, hi = min(values), max(values)
        if v == lo or v == hi:
            out.append(Edge(ax, v, "lowest" if v == lo else "highest", lo, hi))
    return out


def _match_baselines(arms: list[Arm], base: dict) -> None:
    chosen = [a for a in arms if a.selected]
    for a in chosen:
        if a.is_baseline:
            continue
        candidates = [b for b in chosen if b.is_baseline and b.dataset == a.dataset]
        rest = [ax for ax, _ in a.key if ax not in base and ax not in a.select_axes]
        exact = [b for b in candidates if all(same(a.value(ax), b.value(ax)) for ax in rest)]
        match = exact[0] if len(exact) == 1 else candidates[0] if len(candidates) == 1 else None
        if match is not None:
            a.baseline = match
            a.welch = welch(a.accs, match.accs)


def status_counts(arms: list[Arm]) -> Counter:
    total: Counter = Counter()
    for a in arms:
        total.update(a.counts)
    return Counter({s: total[s] for s in STATUS_ORDER if total[s]})


def compare_picks(arms: list[Arm], dataset: str, usable=lambda run: True) -> list[tuple[Run, str]]:
    """analysis.compare's runs on `dataset`: every finished run (INCLUDED, and `usable`, e.g.
    with a checkpoint) of each selected arm, with its arm's label (the full label where two
    arms share a short one). Fewer than two distinct labels: nothing to compare."""
    here = [a for a in arms if a.selected and a.dataset == dataset]
    unique = len({a.label for a in here}) == len(here)
    return [(r, a.label if unique else a.full_label) for a in here for r in a.runs
            if r.status in INCLUDED and usable(r)]


def compare_skip(arms: list[Arm], dataset: str, labels: list[str]) -> str:
    """Why analysis.compare has nothing to compare on `dataset` ('' when it has), given the arm
    labels of its picks (compare_picks)."""
    labels = list(dict.fromkeys(labels))
    if len(labels) >= 2:
        return ""
    here = [a for a in arms if a.selected and a.dataset == dataset]
    which = f" ({labels[0]})" if labels and len(here) > 1 else ""
    return (f"the prediction comparison (analysis.compare) was skipped on {dataset}: "
            f"{len(labels)} of its {len(here)} arm{'s' if len(here) != 1 else ''} "
            f"{'has' if len(labels) == 1 else 'have'} a finished run{which}, and comparing "
            "predictions needs two (diverged and failed runs have no predictions to compare)")
