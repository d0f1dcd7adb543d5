"""An output folder as flat records, for exports (`bnlab runs --format csv|json`) and for the
DataFrames of the Python API (bnlab.load_runs, load_metrics, load_probes).

Every record starts with the run's identity: `run_id`, and for a study folder (one with
study.json) `arm` (the arm's label exactly as the report and compare.json give it: the values
of the varying axes except seed, dataset and options that never make an arm, leaving out an
axis whose value follows from the axes before it and one whose value does not apply to the arm
(first_k without placement first_k), e.g. "norm=bn, lr=0.1"; "all runs" when only seeds vary),
`dataset` (the study's name for it), `seed` and the value of every other axis; for a plain
folder of `bnlab train` runs, `dataset`, `model`, `norm` and `seed` from each run's config.

    run_records     one per run: identity, status and results (summary.json), then every
                    config option; in a study, also runs never started (status `pending`);
                    a run left `running` by a process that died is `interrupted`
    metric_records  one per run, epoch and metric of metrics.jsonl: identity, epoch, step,
                    metric, value
    probe_records   one per probes.jsonl row: identity, step, epoch, layer, metric, unit, value

Numbers the store wrote as text because JSON cannot hold them ("nan", "inf") come back as
floats; tables of options (norm_options, ...) stay dicts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bnlab.errors import StorageError, UserError
from bnlab.report.arms import key_label, named_axes, not_applying
from bnlab.report.load import NOT_ARM_AXES, arm_key, planned_value, run_dataset
from bnlab.store import RunDir, Store, open_store, warn

RESULTS = ("status", "epochs_done", "test_acc", "test_loss", "train_acc", "train_loss",
           "val_acc", "val_loss", "wall_time", "diverged_step", "test_loss_nonfinite_epoch",
           "at_chance_until_epoch", "error")
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
PLAIN_KEYS = ("dataset", "model", "norm", "seed")  # identity of a run outside a study


def _number(v: Any) -> Any:
    return NON_FINITE.get(v, v) if isinstance(v, str) else v


def _open(out: str | Path) -> Store:
    return open_store(out, must_exist=True)  # the same refusal as `bnlab runs`


def _config(run: RunDir) -> dict:
    """The run's stored config; {} where its config.json is damaged (run_records warns)."""
    try:
        return run.config or {}
    except StorageError:
        raise
    except UserError:
        return {}


def _identities(store: Store) -> list[tuple[RunDir, dict[str, Any]]]:
    """(run folder, identity columns) of every run: a study's planned runs in plan order, else
    the index's runs in id order."""
    meta = store.read_meta("study.json")
    if isinstance(meta, dict) and isinstance(meta.get("runs"), list):
        axes = list(meta.get("axes") or [])
        arm_axes = [a for a in axes if a not in NOT_ARM_AXES]
        base_dataset = ((meta.get("spec") or {}).get("base") or {}).get("dataset")
        runs = []
        for entry in meta["runs"]:
            values = dict(entry.get("values") or {})
            run = store.run(entry["run_id"])
            # the config only where study.json lacks a value (as load.Run.value reads it)
            need = any(a not in values for a in ("seed", "dataset", *arm_axes))
            config = _config(run) if need and run.exists() else {}
            key = (run_dataset(values, config or None, base_dataset),
                   arm_key(values, config, arm_axes))
            if "seed" not in values:  # a study whose runs share one seed
                values["seed"] = config.get("seed")
            runs.append((entry["run_id"], run, values, key))
        # the report's labels (load.Study.select_best, arms.label_axes), so that `arm` joins
        # with the arms of the report's tables and of compare.json
        analysis = meta.get("analysis") or (meta.get("spec") or {}).get("analysis") or {}
        keep = [a for a in analysis.get("select_best", []) if a in arm_axes]
        keys = [key for *_, key in runs]
        named = named_axes(keys, arm_axes, keep)
        drops = not_applying(keys, named, lambda k: _fixed(k, runs, meta))
        out = []
        for run_id, run, values, (ds, key) in runs:
            shown = tuple(a for a in named if a not in drops[(ds, key)])
            ident = {"run_id": run_id, "arm": key_label(key, shown),
                     "dataset": values.get("dataset"), "seed": values["seed"]}
            ident.update({a: values.get(a) for a in axes if a not in ident})
            out.append((run, ident))
        return out
    out = []
    for row in store.rows():
        cfg = json.loads(row["config"])
        out.append((store.run(row["run_id"]),
                    {"run_id": row["run_id"], **{k: cfg.get(k) for k in PLAIN_KEYS}}))
    return out


def _fixed(key: str, runs: list[tuple], meta: dict) -> Any:
    """load.Study.fixed for an export: the first stored config that has `key`, else the
    plan's value."""
    for _, run, _, _ in runs:
        config = _config(run) if run.exists() else {}
        if key in config:
            return config[key]
    return planned_value(key, meta.get("spec") or {}, meta.get("sets") or {})


def run_records(out: str | Path) -> list[dict[str, Any]]:
    store = _open(out)
    records = []
    for run, ident in _identities(store):
        try:
            stored = run.stored() if run.exists() else None
        except StorageError:
            raise
        except UserError as e:  # damaged as the report and `bnlab runs` read it: left out
            warn(f"{e}; run {run.run_id} left out")
            continue
        summary = run.summary or {}
        rec = dict(ident)
        status = "pending" if stored is None else summary.get("status", "running")
        if status == "running" and not store.is_locked(run.run_id):
            status = "interrupted"  # as `bnlab study status` says: nobody is training it
        rec["status"] = status
        rec.update({k: _number(summary.get(k)) for k in RESULTS[1:]})
        for k, v in ((stored or {}).get("config") or {}).items():
            rec.setdefault(k, v)
        records.append(rec)
    return records


def metric_records(out: str | Path) -> list[dict[str, Any]]:
    records = []
    for run, ident in _identities(_open(out)):
        for row in run.epoch_rows():
            for k, v in row.to_dict().items():
                if k not in ("epoch", "step"):
                    records.append({**ident, "epoch": row.epoch, "step": row.step,
                                    "metric": k, "value": _number(v)})
    return records


def probe_records(out: str | Path) -> list[dict[str, Any]]:
    records = []
    for run, ident in _identities(_open(out)):
        for row in run.read_rows("probes.jsonl"):
            records.append({**ident, "step": row.get("step"), "epoch": row.get("epoch"),
                            "layer": row.get("layer"), "metric": row.get("metric"),
                            # per-unit rows (unit_p15/p50/p85) name their unit; pooled rows: None
                            "unit": row.get("unit"), "value": _number(row.get("value"))})
    return records
