"""Read a study's output folder (study.json, run folders, analysis/) into plain records.

Nothing here computes a statistic; it only gathers what the runner and the analysis stored, and
decides for every run which arm it belongs to:

    dataset  the study's dataset name for the run (values["dataset"], else the config's)
    arm      the run's values of every varying axis except NOT_ARM_AXES (`dataset`, and
             config.NOT_ARM_KEYS: `seed` and options such as `probe_every` or `compile` that
             leave a run's result unchanged)
    status   summary.json's status; "missing" when the run folder has no config.json yet,
             "interrupted" for a "running" run that no process holds the lock of
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.config import FIELDS, NOT_ARM_KEYS, dataset_tag
from bnlab.errors import StorageError, UserError
from bnlab.store import EpochRow, Store, warn

# axes that never make an arm: config.NOT_ARM_KEYS, and the dataset (arms are per dataset)
NOT_ARM_AXES = frozenset({"dataset", *NOT_ARM_KEYS})
DEFAULT_BASELINE = {"norm": "bn"}
STATUS_ORDER = ("completed", "no_learning", "diverged", "failed", "running", "interrupted",
                "missing")


def canon(v: Any) -> str:
    """A hashable, order-independent form of an axis value (floats and dicts included)."""
    return json.dumps(v, sort_keys=True)


def same(a, b) -> bool:
    """Equality of config values across TOML and JSON (1 == 1.0, but True != 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def number(v: Any) -> float | None:
    """A finite float, or None (the store writes non-finite numbers as strings)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


@dataclass
class Run:
    run_id: str
    values: dict[str, Any]
    dataset: str
    seed: Any
    status: str
    config: dict[str, Any] | None
    env: dict[str, Any] | None
    data: dict[str, Any] | None
    model: dict[str, Any] | None
    summary: dict[str, Any]
    metrics: list[EpochRow]  # metrics.jsonl, one typed row per epoch
    probes: list[dict]
    arm: tuple[tuple[str, str], ...] = ()
    distributed: dict[str, Any] | None = None  # config.json's batch split (bnlab.train.distributed)

    def value(self, key: str) -> Any:
        """The run's value of a config key: the study's value, else the stored config's."""
        if key in self.values:
            return self.values[key]
        return (self.config or {}).get(key)

    @property
    def final_test_acc(self) -> float | None:
        return number(self.summary.get("test_acc"))

    @property
    def final_train_acc(self) -> float | None:
        return number(self.summary.get("train_acc"))

    @property
    def final_val_acc(self) -> float | None:
        return number(self.summary.get("val_acc"))

    @property
    def slow_start(self) -> int | None:
        """For a run that ended above chance (completed): the last epoch of its initial stall
        at chance when that stall lasted at least the first quarter of training, else None."""
        k, epochs = self.summary.get("at_chance_until_epoch"), (self.config or {}).get("epochs")
        if self.status != "completed" or not isinstance(k, int) or not isinstance(epochs, int):
            return None
        return k if k >= max(1, math.ceil(epochs / 4)) else None


@dataclass
class Comparison:
    """One stored prediction comparison: its folder under OUT (analysis or analysis/<dataset>),
    the dataset its runs were trained on (None when unknown) and its compare.json."""

    folder: str
    dataset: str | None
    data: dict[str, Any]


@dataclass
class Study:
    root: Path
    name: str
    description: str
    spec: dict[str, Any]
    sets: dict[str, Any]
    only: dict[str, Any]
    data_map: dict[str, Any]
    axes: list[str]
    analysis: dict[str, Any]
    runs: list[Run]
    comparisons: list[Comparison] = field(default_factory=list)
    store: Store | None = field(default=None, repr=False)
    tuning: dict[str, Any] = field(default_factory=dict)  # study.json's [tune] outcome

    @property
    def compare(self) -> dict[str, Any] | None:
        """The first comparison's compare.json (OUT/analysis/), None without one."""
        return self.comparisons[0].data if self.comparisons else None

    @property
    def arm_axes(self) -> list[str]:
        return [a for a in self.axes if a not in NOT_ARM_AXES]

    @property
    def select_best(self) -> list[str]:
        return [a for a in self.analysis.get("select_best", []) if a in self.arm_axes]

    @property
    def select_on(self) -> str:
        """'val' (the held-out validation split) or 'test'. Studies written before the
        validation split existed selected on the test set."""
        return str(self.analysis.get("select_on", "test"))

    @property
    def baseline(self) -> dict[str, Any]:
        """analysis.baseline, its keys in the order of the study's axes."""
        return in_axis_order(self.analysis.get("baseline") or DEFAULT_BASELINE, self.axes)

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.runs))

    def fixed(self, key: str) -> Any:
        """The value of an option that no axis varies: a stored config's, else the plan's
        (planned_value); None where neither tells."""
        for r in self.runs:
            if r.config is not None and key in r.config:
                return r.config[key]
        return planned_value(key, self.spec, self.sets)


def in_axis_order(values: dict[str, Any], axes: list[str]) -> dict[str, Any]:
    """`values` with its keys in the order of `axes` (the spec's grid as written, then its
    cases', as arm labels name them), other keys after them: study.json stores every table
    with its keys sorted by name."""
    place = {a: i for i, a in enumerate(axes)}
    return dict(sorted(values.items(), key=lambda kv: place.get(kv[0], len(axes))))


def planned_value(key: str, spec: dict, sets: dict) -> Any:
    """The value that study.json's plan gives every run of an option no axis varies: --set's,
    else a one-value [grid] axis's, else [base]'s, else RunConfig's default; None where a case
    sets it (which runs it reaches only the runs' stored configs tell)."""
    def named(table) -> dict:
        return {str(k).replace("-", "_"): v for k, v in table.items()} \
            if isinstance(table, dict) else {}

    if key in named(sets):
        return named(sets)[key]
    grid = named(spec.get("grid"))
    if key in grid:
        return grid[key][0] if isinstance(grid[key], list) and len(grid[key]) == 1 else None
    cases = spec.get("cases") if isinstance(spec.get("cases"), list) else []
    if any(key in named(c.get("set")) or key in named(c.get("grid"))
           for c in cases if isinstance(c, dict)):
        return None
    base = named(spec.get("base"))
    if key in base:
        return base[key]
    f = FIELDS.get(key)
    if f is None:
        return None
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def arm_key(values: dict, config: dict | None, arm_axes: list[str]) -> tuple:
    """A run's arm: its value of every arm axis, the study's value, else its config's."""
    return tuple((a, canon(values[a] if a in values else (config or {}).get(a)))
                 for a in arm_axes)


def run_dataset(values: dict, config: dict | None, base_dataset: str | None) -> str:
    """The study's name for a run's dataset: its value, else its config's, else the base's."""
    if "dataset" in values:
        return dataset_tag(str(values["dataset"]))
    if config is not None:
        return dataset_tag(str(config["dataset"]))
    return str(base_dataset or "unknown")


def load_study(out_dir: str | Path) -> Study:
    root = Path(out_dir)
    if not (root / "study.json").is_file():
        raise UserError(f"{str(root)!r} is not a study output folder (no study.json); run "
                        "`bnlab study run SPEC` first or pass the folder it wrote")
    store = Store(root, readonly=True)  # a report reads; it writes only its own files
    meta = store.read_meta("study.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("runs"), list) or not all(
            isinstance(r, dict) and isinstance(r.get("run_id"), str) for r in meta["runs"]):
        raise UserError(f"{str(root / 'study.json')!r} has no list of runs")
    spec = meta.get("spec") or {}
    base_dataset = (spec.get("base") or {}).get("dataset")
    axes = list(meta.get("axes") or [])
    runs = []
    for entry in meta["runs"]:
        runs.append(_load_run(store, entry, base_dataset))
    arm_axes = [a for a in axes if a not in NOT_ARM_AXES]
    for r in runs:
        r.arm = arm_key(r.values, r.config, arm_axes)
    comparisons = _comparisons(store, runs)
    return Study(root=root, name=str(meta.get("name", root.name)),
                 description=str(meta.get("description", "")), spec=spec,
                 sets=dict(meta.get("sets") or {}), only=dict(meta.get("only") or {}),
                 data_map=dict(meta.get("data_map") or {}), axes=axes,
                 analysis=dict(meta.get("analysis") or spec.get("analysis") or {}),
                 runs=runs, comparisons=comparisons, store=store,
                 tuning=meta["tuning"] if isinstance(meta.get("tuning"), dict) else {})


def _comparisons(store: Store, runs: list[Run]) -> list[Comparison]:
    """The prediction comparisons the runner stored: OUT/analysis/compare.json (the first
    dataset compared), then OUT/analysis/<dataset>/compare.json for the others, by name."""
    root = store.root / "analysis"
    folders = ["analysis"] if (root / "compare.json").is_file() else []
    if root.is_dir():
        folders += [f"analysis/{d.name}" for d in sorted(root.iterdir())
                    if d.is_dir() and (d / "compare.json").is_file()]
    dataset_of = {r.run_id: r.dataset for r in runs}
    out = []
    for folder in folders:
        data = store.read_meta(f"{folder}/compare.json")
        if not isinstance(data, dict):
            continue
        if folder == "analysis":
            first = next(iter(data.get("runs") or data.get("models") or []), {})
            dataset = dataset_of.get(first.get("run_id") if isinstance(first, dict) else None)
        else:
            dataset = folder.split("/", 1)[1]
        out.append(Comparison(folder=folder, dataset=dataset, data=data))
    return out


def _load_run(store: Store, entry: dict, base_dataset: str | None) -> Run:
    run_id = str(entry["run_id"])
    values = dict(entry.get("values") or {})
    rd = store.run(run_id)
    try:
        stored = rd.stored() if rd.exists() else None
    except StorageError:
        raise
    except UserError as e:  # a damaged config: the run is reported as missing
        warn(f"{e}; run {run_id} left out of the report")
        stored = None
    stored = stored if isinstance(stored, dict) else None
    config = (stored or {}).get("config")
    summary = rd.summary or {}  # damaged: {} (the run counts as interrupted)
    if config is None:
        status = "missing"
    else:
        status = str(summary.get("status", "running"))
        if status == "running" and not store.is_locked(run_id):
            status = "interrupted"  # as `bnlab study status` says: nobody is training it
    dataset = run_dataset(values, config, base_dataset)
    seed = values.get("seed", (config or {}).get("seed"))
    return Run(run_id=run_id, values=values, dataset=dataset, seed=seed, status=status,
               config=config, env=(stored or {}).get("env"), data=(stored or {}).get("data"),
               model=(stored or {}).get("model"), summary=summary,
               metrics=rd.epoch_rows() if config is not None else [],
               probes=rd.read_rows("probes.jsonl") if config is not None else [],
               distributed=(stored or {}).get("distributed"))
