"""Study specs: a TOML file (or a built-in name) read and checked into a `Spec`.

A spec has a `[base]` run config, a `[grid]` whose axes are multiplied out, and `[[cases]]` that
are applied in order to the expanded grid: a case whose `where` values all equal a run's values
overrides that run with `set` and/or multiplies it by the case's own `grid`. On top of the spec,
the command line may override values in every run (`--set`), keep a subset (`--only`) and point
placeholder dataset names at real data (`--data-map`): their flags are parsed here too.

The stages after parsing have their own modules: expand.py multiplies a Spec out into a Plan of
validated run configs (`expand` and `Plan` are importable from here as well, the names most
callers use), preflight.py checks the plan's names against the registries just before running,
and tuning.py holds the protocol of a [tune] section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bnlab.config import FIELDS, _coerce
from bnlab.errors import UserError, suggest, unknown

# expand() and Plan are expand.py's (which reads a Spec without importing this module), named
# here as well: a spec is loaded and expanded together almost everywhere
from bnlab.study.expand import Plan, expand  # noqa: F401
from bnlab.study.tuning import TUNE_KEYS, Tune

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


def plan_of_study_json(meta: dict) -> Plan:
    """The plan an OUT/study.json describes, expanded again: its spec with the --set, --only
    and --data-map it was run with and the precision it chose for "auto"."""
    sp = parse_spec(meta["spec"], source="table", default_name=meta["name"])
    sets = [coerce(str(k), v, "--set") for k, v in (meta.get("sets") or {}).items()]
    only = [coerce(str(k), x, "--only") for k, v in (meta.get("only") or {}).items()
            for x in (v if isinstance(v, list) else [v])]
    return expand(sp, sets, only, dict(meta.get("data_map") or {}),
                  auto_precision=meta.get("precision_auto"))


def with_seeds(spec: Spec, n: int) -> Spec:
    """`spec` with its [grid] seed axis replaced by seeds 0 .. n-1 (`study run --seeds N`): the
    runs of seeds both lists hold are the same runs (same run ids), so a finished study's
    folder grows by the new seeds only. [tune] and [[cases]] that name one seed keep it."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"seeds must be an integer >= 1, got {n!r}")
    if "seed" not in spec.grid:
        raise UserError(f"study {spec.name!r} has no seed axis in its [grid]; --seeds replaces "
                        "that axis")
    raw = json.loads(json.dumps(spec.raw))
    raw["grid"]["seed"] = list(range(n))
    return parse_spec(raw, source=spec.source, default_name=spec.name)


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


# -- the command line's changes: --set, --only, --data-map --------------------------------------
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
