"""Study specs: a TOML file (or a built-in name) expanded into a list of validated run configs.

A spec has a `[base]` run config, a `[grid]` whose axes are multiplied out, and `[[cases]]` that
are applied in order to the expanded grid: a case whose `where` values all equal a run's values
overrides that run with `set` and/or multiplies it by the case's own `grid`. On top of the spec,
the command line may override values in every run (`--set`), keep a subset (`--only`) and point
placeholder dataset names at real data (`--data-map`). Every run is identified by
`RunConfig.run_id()`; runs that end up identical are kept once.

Names of norms, inits and models are not checked here: the registries grow independently, so
they are checked by `preflight` just before running (and a run that fails anyway is recorded
as failed by the runner).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from bnlab.config import FIELDS, NOT_ARM_KEYS, RunConfig, _coerce, validate
from bnlab.errors import UserError, suggest, unknown
from bnlab.store import warn
from bnlab.study.tuning import TUNE_KEYS, Tune, group_key, tuning_configs
from bnlab.usercode import ENTRY

SECTIONS = ("name", "description", "max_runs", "base", "grid", "cases", "tune", "analysis",
            "estimate")
CASE_KEYS = ("where", "set", "grid")
ANALYSIS_KEYS = ("select_best", "select_on", "compare", "corruptions", "baseline")
SELECT_ON = ("val", "test")  # the split select_best chooses on
ESTIMATE_KEYS = ("cpu_minutes", "gpu_minutes", "sizes")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DEFAULT_ROOT = Path("studies-out")  # a study's folder by default: DEFAULT_ROOT / its name


# -- loading -----------------------------------------------------------------------------------
def builtin_names() -> list[str]:
    folder = resources.files("bnlab") / "studies"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def _builtin_text(name: str) -> str | None:
    p = resources.files("bnlab") / "studies" / f"{name}.toml"
    return p.read_text() if p.is_file() else None


def looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or "/" in text or text.startswith(".")


@dataclass
class Case:
    where: dict[str, Any]
    set: dict[str, Any]
    grid: dict[str, list]


@dataclass
class Spec:
    name: str
    description: str
    source: str  # "built-in", "table" (given as a dict from Python) or the file path
    raw: dict[str, Any]  # the TOML as read
    base: dict[str, Any]  # coerced [base] values
    grid: dict[str, list]
    cases: list[Case]
    analysis: dict[str, Any]
    estimate: dict[str, Any]  # sizes: {dataset: (train, test)}; minutes given by the spec
    tune: Tune | None = None  # [tune]: one value of an arm chosen on one seed first


def load_spec(text: str) -> Spec:
    """A spec from a built-in name or a TOML path; errors name the file and the bad key."""
    if not looks_like_path(text):
        body = _builtin_text(text)
        if body is not None:
            return parse_spec(tomllib.loads(body), source="built-in", default_name=text)
        if not Path(text).is_file():
            raise unknown("study", text, builtin_names())
    path = Path(text)
    if not path.is_file():
        raise UserError(f"study spec {text!r} does not exist (give a built-in name: "
                        f"{', '.join(builtin_names())}, or a .toml file)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"study spec {text!r} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"study spec {text!r} is not UTF-8 text") from None
    return parse_spec(data, source=str(path), default_name=path.stem)


# -- parsing and validation --------------------------------------------------------------------
def field_name(key: str, where: str) -> str:
    k = str(key).replace("-", "_")
    if k not in FIELDS:
        raise UserError(f"unknown key {key!r} in {where}{suggest(k, FIELDS)}; accepted: "
                        f"{', '.join(FIELDS)}")
    return k


def coerce(key: str, value: Any, where: str) -> tuple[str, Any]:
    """(field, value converted to the field's type), or a one-line UserError naming `where`."""
    k = field_name(key, where)
    try:
        v = _coerce(k, value)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    choices = FIELDS[k].metadata.get("choices")
    if choices and v not in choices:
        raise UserError(f"{where}: {k} {v!r} is not accepted{suggest(v, choices)}; "
                        f"accepted: {', '.join(choices)}")
    return k, v


def _table(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a table, got {value!r}")
    return value


def _values(table: dict, where: str) -> dict[str, Any]:
    return dict(coerce(k, v, f"{where} {k}") for k, v in _table(table, where).items())


def _axes(table: dict, where: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for key, values in _table(table, where).items():
        if not isinstance(values, list):
            raise UserError(f"{where} axis {key!r} must be a list, e.g. {key} = [{values!r}], "
                            f"got {values!r}")
        if not values:
            raise UserError(f"{where} axis {key!r} is an empty list: give at least one value")
        coerced = [coerce(key, v, f"{where} {key}")[1] for v in values]
        out[field_name(key, where)] = coerced
    return out


def _keys(table: dict, allowed: tuple, where: str) -> None:
    for k in table:
        if k not in allowed:
            raise UserError(f"unknown key {k!r} in {where}{suggest(k, allowed)}; accepted: "
                            f"{', '.join(allowed)}")


def parse_spec(data: dict, source: str = "built-in", default_name: str = "study") -> Spec:
    # a spec from a file is named by its path; one built in, or given as a table, by its name
    label = f"spec {default_name!r}" if source in ("built-in", "table") else f"spec {source!r}"
    _keys(data, SECTIONS, label)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UserError(f"{label}: name must be letters, digits, '_', '-' or '.', got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{label}: description must be a string, got {description!r}")

    max_runs = data.get("max_runs", 1)  # runs `study run` starts without --yes
    if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
        raise UserError(f"{label}: max_runs must be a whole number of runs >= 1, got "
                        f"{max_runs!r}")

    base = _values(data.get("base", {}), f"{label} [base]")
    grid = _axes(data.get("grid", {}), f"{label} [grid]")
    if not grid:
        raise UserError(f"{label} has an empty [grid]: give at least one axis, e.g. "
                        "seed = [0, 1, 2]")

    cases_raw = data.get("cases", [])
    if not isinstance(cases_raw, list):
        raise UserError(f"{label}: cases must be an array of tables ([[cases]]), got "
                        f"{cases_raw!r}")
    cases = []
    for i, c in enumerate(cases_raw, 1):
        where = f"{label} case {i}"
        _keys(_table(c, where), CASE_KEYS, where)
        if "set" not in c and "grid" not in c:
            raise UserError(f"{where} has neither set nor grid: it would change nothing")
        cases.append(Case(where=_values(c.get("where", {}), f"{where} where"),
                          set=_values(c.get("set", {}), f"{where} set"),
                          grid=_axes(c.get("grid", {}), f"{where} grid")))

    analysis = _parse_analysis(_table(data.get("analysis", {}), f"{label} [analysis]"), label)
    tune = _parse_tune(_table(data["tune"], f"{label} [tune]"), label) if "tune" in data else None
    return Spec(name, description, source, data, base, grid, cases, analysis,
                _parse_estimate(_table(data.get("estimate", {}), f"{label} [estimate]"), label),
                tune)


def _parse_tune(table: dict, label: str) -> Tune:
    """[tune]: where (the tuned runs), axis, values (at least two), seed (default 0) and set
    (what makes a tuning run short)."""
    where = f"{label} [tune]"
    _keys(table, TUNE_KEYS, where)
    for k in ("where", "axis", "values"):
        if k not in table:
            raise UserError(f"{where} needs {k} (e.g. where = {{ norm = \"none\" }}, "
                            "axis = \"lr\", values = [0.01, 0.02, 0.04])")
    axis = field_name(table["axis"], f"{where} axis") if isinstance(table["axis"], str) else None
    if axis is None or axis == "seed":
        raise UserError(f"{where} axis must be the name of a run option other than seed, got "
                        f"{table['axis']!r}")
    values = _axes({axis: table["values"]}, where)[axis]
    if len(values) < 2 or len({json.dumps(v, sort_keys=True) for v in values}) < len(values):
        raise UserError(f"{where} values must be at least two different values, got "
                        f"{table['values']!r}")
    seed = table.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"{where} seed must be an integer >= 0, got {seed!r}")
    sets = _values(table.get("set", {}), f"{where} set")
    if "seed" in sets or axis in sets:
        raise UserError(f"{where} set may not change seed or {axis} (the tuning runs' seed is "
                        "tune.seed, their value the one tried)")
    return Tune(_values(table["where"], f"{where} where"), axis, tuple(values), seed, sets)


def _parse_estimate(est: dict, label: str) -> dict[str, Any]:
    """[estimate]: `sizes = { name = [train images, test images] }` for datasets whose size
    bnlab cannot know (a placeholder mapped to a folder); `cpu_minutes` / `gpu_minutes` given
    by hand replace the estimate from measured throughput (bnlab.study.estimate)."""
    where = f"{label} [estimate]"
    _keys(est, ESTIMATE_KEYS, where)
    out: dict[str, Any] = {}
    for k, v in est.items():
        if k == "sizes":
            sizes = _table(v, f"{where} sizes")
            for name, pair in sizes.items():
                if not (isinstance(pair, list) and len(pair) in (2, 3) and all(
                        isinstance(n, int) and not isinstance(n, bool) and n > 0
                        for n in pair)):
                    raise UserError(f"{where} sizes.{name} must be [training images, test "
                                    f"images] or [..., side in px] (positive integers), got "
                                    f"{pair!r}")
            out["sizes"] = {name: tuple(pair) for name, pair in sizes.items()}
        elif isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
            raise UserError(f"{where} {k} must be a number of minutes >= 0, got {v!r}")
        else:
            out[k] = float(v)
    return out


def _parse_analysis(table: dict, label: str) -> dict[str, Any]:
    where = f"{label} [analysis]"
    _keys(table, ANALYSIS_KEYS, where)
    select = table.get("select_best", [])
    if not isinstance(select, list) or not all(isinstance(s, str) for s in select):
        raise UserError(f"{where} select_best must be a list of keys, got {select!r}")
    compare = table.get("compare", False)
    if not isinstance(compare, bool):
        raise UserError(f"{where} compare must be true or false, got {compare!r}")
    corruptions = table.get("corruptions", True)
    if not isinstance(corruptions, bool):
        raise UserError(f"{where} corruptions must be true or false, got {corruptions!r}")
    select_on = table.get("select_on", "val")
    if select_on not in SELECT_ON:
        raise UserError(f"{where} select_on must be one of {', '.join(SELECT_ON)}, got "
                        f"{select_on!r}")
    return {"select_best": [field_name(s, f"{where} select_best") for s in select],
            "select_on": select_on, "compare": compare, "corruptions": corruptions,
            "baseline": _values(table.get("baseline", {}), f"{where} baseline")}


# -- expansion ---------------------------------------------------------------------------------
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

    @property
    def tune_runs(self) -> list[PlannedRun]:
        return [r for g in self.groups for r in g.tuning]

    @property
    def all_runs(self) -> list[PlannedRun]:
        """Every run the plan will train: tuning runs, runs, runs waiting for their choice."""
        return [*self.tune_runs, *self.runs, *self.waiting]

    def with_choices(self, chosen: dict[str, Any]) -> Plan:
        """The plan expanded again with `chosen` ({group key: value}) for the tuned runs."""
        return expand(*self.args, chosen=chosen)

    def study_json(self) -> dict[str, Any]:
        """The OUT/study.json document (see the contract in docs/studies.md)."""
        doc = {"name": self.spec.name, "description": self.spec.description,
               "spec": self.spec.raw, "sets": self.sets, "only": self.only,
               "data_map": self.data_map, "axes": self.axes,
               "runs": [{"run_id": r.run_id, "values": r.values} for r in self.runs],
               "analysis": self.spec.analysis}
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


def parse_assignments(items: list[str] | None, flag: str) -> list[tuple[str, Any]]:
    """`key=value` strings of --set/--only as (field, coerced value) pairs."""
    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} expects key=value, got {item!r}")
        k = field_name(key.strip(), flag)
        v: Any = value
        if FIELDS[k].default_factory is not dataclasses.MISSING:  # a table: JSON on the CLI
            try:
                v = json.loads(value)
            except json.JSONDecodeError:
                raise UserError(f"{flag} {k} must be a JSON object, got {value!r}") from None
        out.append(coerce(k, v, flag))
    return out


def parse_data_map(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, dataset = item.partition("=")
        if not sep or not name or not dataset:
            raise UserError(f"--data-map expects NAME=DATASET (e.g. cifar10=imagefolder:PATH), "
                            f"got {item!r}")
        if dataset.startswith("imagefolder:"):
            # an absolute path keeps run ids the same from any working directory
            path = dataset.split(":", 1)[1]
            if path:
                dataset = "imagefolder:" + str(Path(path).expanduser().resolve())
        out[name] = dataset
    return out


def expand(spec: Spec, sets: list[tuple[str, Any]] | None = None,
           only: list[tuple[str, Any]] | None = None,
           data_map: dict[str, str] | None = None,
           chosen: dict[str, Any] | None = None) -> Plan:
    """The runs of `spec` after --set (applied last, to every run), --data-map and --only.

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
    tuned_any = False
    seen: dict[str, dict] = {}  # run id -> the grid point that planned it first
    repeated: list[tuple[dict, dict]] = []  # (first, repeat): grid points that are one run
    for r in raw:
        overrides = {**r, **sets_d}
        cfg = dataclasses.replace(base, **overrides)
        name = cfg.dataset
        cfg = dataclasses.replace(cfg, dataset=data_map.get(name, name))
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
                args)


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


# -- checks just before running ----------------------------------------------------------------
# The registries below import torch: loaded when a plan is checked before running, so that
# reading and expanding specs (`bnlab study list`) stays free of torch's start-up time.
def known_datasets() -> tuple[str, ...]:
    """The dataset registry's plain names; its pattern imagefolder:PATH is checked by its path."""
    from bnlab.data import DATASETS

    return tuple(name for name in DATASETS if ":" not in name)


def _registries() -> dict[str, dict]:
    """The name registries of the model, norm and init factories."""
    from bnlab.models import MODELS
    from bnlab.models.init import INITS
    from bnlab.norm import FORMULAS

    return {"model": MODELS, "norm": FORMULAS, "init": INITS}


def preflight(plan: Plan) -> None:
    """Refuse, before anything is trained, names that nothing knows: unmapped placeholder
    datasets, image folders that do not exist, models, norms and inits missing from their
    registries (and for an entry: model, its module and function), an unavailable device,
    TensorBoard output without the tensorboard package.

    Only names are checked: a combination a factory refuses (say, options of one norm) is a run
    that fails at run time, recorded as failed while the rest of the study goes on.
    """
    from bnlab.models.entry import check_entry
    from bnlab.runtime import resolve_device
    from bnlab.train.board import require_tensorboard

    known = known_datasets()
    for r in plan.all_runs:
        ds = r.cfg.dataset
        if ds not in known and not ds.startswith("imagefolder:"):
            raise UserError(f"dataset {ds!r} of study {plan.spec.name!r} is not a dataset "
                            f"name{suggest(ds, known)}: map it with --data-map "
                            f"{ds}=imagefolder:PATH (or one of {', '.join(known)})")
    for ds in dict.fromkeys(r.cfg.dataset for r in plan.all_runs):
        path = ds.removeprefix("imagefolder:")
        if ds.startswith("imagefolder:") and not Path(path).expanduser().exists():
            raise UserError(f"image folder {path!r} of study {plan.spec.name!r} does not "
                            "exist: give --data-map NAME=imagefolder:PATH a folder in the "
                            "ImageNet layout (train/, val/ or test/) or a .tar/.tar.gz of one")
    for kind, names in _registries().items():
        for value in dict.fromkeys(getattr(r.cfg, kind) for r in plan.all_runs):
            if value not in names:
                raise unknown(kind, value, names)
            if kind == "model" and value.startswith(ENTRY):
                check_entry(value)  # its module and function, before anything trains
    for device in sorted({r.cfg.device for r in plan.all_runs}):
        resolve_device(device)
    if any(r.cfg.tensorboard for r in plan.all_runs):
        require_tensorboard()
