"""A Spec (bnlab/study/spec.py) multiplied out into a Plan: the grid, its cases, then the
command line's --set, --data-map and --only, every run validated and identified by
`RunConfig.run_id()`; runs that end up identical are kept once. With a [tune] section, the tuned
runs wait for their group's choice and the group's tuning runs are planned (bnlab.study.tuning).

Names of norms, inits and models are not checked here: the registries grow independently, so
they are checked by bnlab.study.preflight just before running (and a run that fails anyway is
recorded as failed by the runner).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnlab.config import FIELDS, NOT_ARM_KEYS, RunConfig, validate
from bnlab.errors import UserError, suggest
from bnlab.store import warn
from bnlab.study.tuning import group_key, tuning_configs

if TYPE_CHECKING:  # spec.py names expand() and Plan for its callers, so it is not imported here
    from bnlab.study.spec import Spec


@dataclass
class PlannedRun:
    cfg: RunConfig
    dataset: str  # the dataset name in the spec, before --data-map
    values: dict[str, Any] = field(default_factory=dict)  # axes (and dataset) -> value

    @property
    def run_id(self) -> str:
        return self.cfg.run_id()


@dataclass
class TuneGroup:
    """The tuned runs of a [tune] section that differ only in seed: their tuning runs, and the
    value chosen for them (None until it is)."""

    key: str
    dataset: str  # the dataset name in the spec
    tuning: list[PlannedRun]
    chosen: Any = None
    label: dict[str, Any] = field(default_factory=dict)  # the group's values of the axes


@dataclass
class Plan:
    spec: Spec
    runs: list[PlannedRun]  # every run whose configuration is known (tuned ones once chosen)
    axes: list[str]
    sets: dict[str, Any]
    only: dict[str, Any]
    data_map: dict[str, str]
    groups: list[TuneGroup] = field(default_factory=list)  # [tune]: one per tuned group
    waiting: list[PlannedRun] = field(default_factory=list)  # tuned runs before their choice
    args: tuple = ()  # expand()'s arguments, to expand again with the choices
    auto_precision: str | None = None  # what precision "auto" became (bnlab.study.calibrate)

    @property
    def tune_runs(self) -> list[PlannedRun]:
        return [r for g in self.groups for r in g.tuning]

    @property
    def all_runs(self) -> list[PlannedRun]:
        """Every run the plan will train: tuning runs, runs, runs waiting for their choice."""
        return [*self.tune_runs, *self.runs, *self.waiting]

    def with_choices(self, chosen: dict[str, Any]) -> Plan:
        """The plan expanded again with `chosen` ({group key: value}) for the tuned runs."""
        return expand(*self.args, chosen=chosen, auto_precision=self.auto_precision)

    @property
    def asks_auto_precision(self) -> bool:
        """Some run asks for precision "auto" and the plan has not chosen it yet."""
        return any(r.cfg.precision == "auto" for r in self.all_runs)

    def with_precision(self, precision: str) -> Plan:
        """The plan expanded again with `precision` for the runs that ask for "auto"."""
        return expand(*self.args, auto_precision=precision)

    def study_json(self) -> dict[str, Any]:
        """The OUT/study.json document (see the contract in docs/studies.md)."""
        doc = {"name": self.spec.name, "description": self.spec.description,
               "spec": self.spec.raw, "sets": self.sets, "only": self.only,
               "data_map": self.data_map, "axes": self.axes,
               "runs": [{"run_id": r.run_id, "values": r.values} for r in self.runs],
               "analysis": self.spec.analysis}
        if self.auto_precision is not None:
            doc["precision_auto"] = self.auto_precision
        t = self.spec.tune
        if t is not None:
            doc["tuning"] = {
                "axis": t.axis, "values": list(t.values), "seed": t.seed, "set": t.set,
                "where": t.where, "protocol": t.describe(), "waiting": len(self.waiting),
                "groups": [{"group": g.key, "dataset": g.dataset, "values": g.label,
                            "chosen": g.chosen,
                            "runs": [{"run_id": r.run_id, "value": getattr(r.cfg, t.axis)}
                                     for r in g.tuning]} for g in self.groups]}
        return doc


def _product(axes: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes.values())]


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _expand_spec(spec: Spec) -> list[dict[str, Any]]:
    """Every run as its overrides of [base], before command-line changes."""
    base = dataclasses.replace(RunConfig(), **spec.base)
    runs = _product(spec.grid)
    for i, case in enumerate(spec.cases, 1):
        out, hits = [], 0
        for r in runs:
            cfg = dataclasses.replace(base, **r)
            if all(_same(getattr(cfg, k), v) for k, v in case.where.items()):
                hits += 1
                out.extend({**r, **case.set, **extra} for extra in _product(case.grid))
            else:
                out.append(r)
        if not hits:
            shown = ", ".join(f"{k}={v!r}" for k, v in case.where.items())
            raise UserError(f"case {i} of spec {spec.name!r} (where {shown}) matches no run "
                            "of the grid")
        runs = out
    return runs


def expand(spec: Spec, sets: list[tuple[str, Any]] | None = None,
           only: list[tuple[str, Any]] | None = None,
           data_map: dict[str, str] | None = None,
           chosen: dict[str, Any] | None = None, auto_precision: str | None = None) -> Plan:
    """The runs of `spec` after --set (applied last, to every run), --data-map and --only;
    with `auto_precision` (fp32 or bf16), the runs that ask for precision "auto" take it (the
    runner chooses it per machine and keeps it in study.json: bnlab.study.status).

    With a [tune] section, the tuned runs (those matching its `where`) whose group has a value
    in `chosen` take it; the others wait (Plan.waiting) and their groups' tuning runs are
    planned (Plan.groups; bnlab.study.tuning). --only keeps tuned runs, not tuning runs: a
    tuned run needs its group's tuning whatever its seed."""
    args = (spec, sets, only, data_map)
    chosen = chosen or {}
    sets_d = dict(sets or [])
    data_map = dict(data_map or {})
    only_d: dict[str, list] = {}
    for k, v in only or []:
        only_d.setdefault(k, []).append(v)

    base = dataclasses.replace(RunConfig(), **spec.base)
    raw = _expand_spec(spec)
    baseline = spec.analysis["baseline"]
    if baseline and not any(all(_same(getattr(dataclasses.replace(base, **r), k), v)
                                for k, v in baseline.items()) for r in raw):
        shown = ", ".join(f"{k}={v!r}" for k, v in baseline.items())
        raise UserError(f"[analysis] baseline ({shown}) of spec {spec.name!r} matches no run")
    logical = sorted({dataclasses.replace(base, **{**r, **sets_d}).dataset for r in raw})
    for name in data_map:
        if name not in logical:
            raise UserError(f"--data-map name {name!r} is not a dataset of study "
                            f"{spec.name!r}{suggest(name, logical)}; its datasets: "
                            f"{', '.join(logical)}")

    tune = spec.tune
    runs: list[PlannedRun] = []
    waiting: list[PlannedRun] = []
    groups: dict[str, TuneGroup] = {}
    tuned_any = asked_auto = False
    seen: dict[str, dict] = {}  # run id -> the grid point that planned it first
    repeated: list[tuple[dict, dict]] = []  # (first, repeat): grid points that are one run
    for r in raw:
        overrides = {**r, **sets_d}
        cfg = dataclasses.replace(base, **overrides)
        name = cfg.dataset
        cfg = dataclasses.replace(cfg, dataset=data_map.get(name, name))
        if cfg.precision == "auto":
            asked_auto = True
            if auto_precision is not None:
                cfg = dataclasses.replace(cfg, precision=auto_precision)
        shown = ", ".join(f"{k}={v!r}" for k, v in r.items())
        try:
            cfg = validate(cfg)
        except UserError as e:
            raise UserError(f"run ({shown}) of spec {spec.name!r}: {e}") from None
        tuned = tune is not None and all(
            _same(getattr(cfg, k), v) or (k == "dataset" and _same(name, v))
            for k, v in tune.where.items())
        tuned_any = tuned_any or tuned
        key = group_key(cfg, tune) if tuned else ""
        if tuned and key in chosen:
            try:
                cfg = validate(dataclasses.replace(cfg, **{tune.axis: chosen[key]}))
            except UserError as e:
                raise UserError(f"run ({shown}) of spec {spec.name!r} at the chosen "
                                f"{tune.axis}: {e}") from None
        if cfg.run_id() in seen:
            first = seen[cfg.run_id()]
            if not any(k in sets_d for k in set(first) ^ set(r) | {
                    k for k in set(first) & set(r) if not _same(first[k], r[k])}):
                repeated.append((first, r))  # not a --set that fixed a varied option
            continue
        seen[cfg.run_id()] = r
        keep = all(any(_same(getattr(cfg, k), v) or (k == "dataset" and _same(name, v))
                       for v in vals) for k, vals in only_d.items())
        if not keep:
            continue
        if tuned and key not in groups:
            groups[key] = TuneGroup(key, name, [PlannedRun(_tuning_cfg(c, spec), name)
                                                for c in tuning_configs(cfg, tune)],
                                    chosen.get(key))
        (waiting if tuned and key not in chosen else runs).append(PlannedRun(cfg, name))
    if tune is not None and not tuned_any:
        shown = ", ".join(f"{k}={v!r}" for k, v in tune.where.items())
        raise UserError(f"[tune] of spec {spec.name!r} (where {shown}) matches no run")
    if repeated:
        warn(_repeat_warning(spec.name, repeated))
    if not runs and not waiting:
        shown = " ".join(f"{k}={v!r}" for k, vals in only_d.items() for v in vals)
        raise UserError(f"no run of study {spec.name!r} matches --only {shown}")

    analysis = spec.analysis
    bad = next((r for g in groups.values() for r in g.tuning if not r.cfg.val_fraction), None)
    if bad is not None:
        raise UserError(f"study {spec.name!r} tunes {tune.axis} on a validation split, but "
                        f"tuning run {bad.run_id} has val_fraction 0: set val_fraction (e.g. "
                        "[base] val_fraction = 0.1)")
    if analysis["select_best"] and analysis["select_on"] == "val":
        bad = next((r for r in runs if not r.cfg.val_fraction), None)
        if bad is not None:
            raise UserError(f"study {spec.name!r} selects {', '.join(analysis['select_best'])} "
                            f"on a validation split, but run {bad.run_id} has val_fraction 0: "
                            "set val_fraction (e.g. [base] val_fraction = 0.1), or select on "
                            "the test set with [analysis] select_on = \"test\"")
    axes = _varying(spec, runs + waiting, list(sets_d))
    for r in runs + waiting + [t for g in groups.values() for t in g.tuning]:
        r.values = {k: (r.dataset if k == "dataset" else getattr(r.cfg, k)) for k in axes}
        r.values.setdefault("dataset", r.dataset)
    for g in groups.values():
        g.label = {k: v for k, v in g.tuning[0].values.items()
                   if k not in NOT_ARM_KEYS and k != tune.axis}
    only_out = {k: v[0] if len(v) == 1 else v for k, v in only_d.items()}
    return Plan(spec, runs, axes, sets_d, only_out, data_map, list(groups.values()), waiting,
                args, auto_precision if asked_auto else None)


def _tuning_cfg(cfg: RunConfig, spec: Spec) -> RunConfig:
    try:
        return validate(cfg)
    except UserError as e:
        raise UserError(f"a tuning run of spec {spec.name!r} ([tune] set): {e}") from None


def _repeat_warning(name: str, repeated: list[tuple[dict, dict]]) -> str:
    """One line: grid points of spec `name` that are the same run as an earlier one (a value
    listed twice in an axis, a case or --set making two points equal) and so run once."""
    first, again = repeated[0]
    shown = ", ".join(f"{k}={v!r}" for k, v in again.items())
    if _same(first, again):
        how = f"({shown}) is listed more than once"
    else:
        other = ", ".join(f"{k}={v!r}" for k, v in first.items())
        how = f"({shown}) is the same run as ({other})"
    n = len(repeated)
    return (f"study {name!r}: {n} grid point{'s' if n != 1 else ''} repeat{'' if n != 1 else 's'}"
            f" a run already planned and {'are' if n != 1 else 'is'} run once, e.g. {how}; a "
            "repeated seed adds no repetition")


def _varying(spec: Spec, runs: list[PlannedRun], set_keys: list[str]) -> list[str]:
    """Keys whose value differs between runs: grid axes first, then cases', then the rest."""
    order = list(spec.grid)
    for c in spec.cases:
        order += list(c.set) + list(c.grid)
    order += set_keys + list(FIELDS)
    axes = []
    for k in dict.fromkeys(order):
        vals = {json.dumps(r.dataset if k == "dataset" else getattr(r.cfg, k), sort_keys=True)
                for r in runs}
        if len(vals) > 1:
            axes.append(k)
    return axes
