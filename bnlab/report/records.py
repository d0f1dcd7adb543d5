"""An output folder as flat records, for exports (`bnlab runs --format csv|json`) and for the
DataFrames of the Python API (bnlab.load_runs, load_metrics, load_probes).

Every record starts with the run's identity: `run_id`, and for a study folder (one with
study.json) `arm` (the values of every varying axis except seed and dataset, as the report
labels them, e.g. "norm=bn, lr=0.1"; "all runs" when only seeds vary), `dataset` (the study's
name for it), `seed` and the value of every other axis; for a plain folder of `bnlab train`
runs, `dataset`, `model`, `norm` and `seed` from each run's config.

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

from bnlab.report.load import NOT_ARM_AXES, fmt_value
from bnlab.store import RunDir, Store, open_store

RESULTS = ("status", "epochs_done", "test_acc", "test_loss", "train_acc", "train_loss",
           "val_acc", "val_loss", "wall_time", "diverged_step", "at_chance_until_epoch", "error")
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
PLAIN_KEYS = ("dataset", "model", "norm", "seed")  # identity of a run outside a study


def _number(v: Any) -> Any:
    return NON_FINITE.get(v, v) if isinstance(v, str) else v


def _open(out: str | Path) -> Store:
    return open_store(out, must_exist=True)  # the same refusal as `bnlab runs`


def _identities(store: Store) -> list[tuple[RunDir, dict[str, Any]]]:
    """(run folder, identity columns) of every run: a study's planned runs in plan order, else
    the index's runs in id order."""
    meta = store.read_meta("study.json")
    if isinstance(meta, dict) and isinstance(meta.get("runs"), list):
        axes = list(meta.get("axes") or [])
        arm_axes = [a for a in axes if a not in NOT_ARM_AXES]
        out = []
        for entry in meta["runs"]:
            values = dict(entry.get("values") or {})
            run = store.run(entry["run_id"])
            if "seed" not in values:  # a study whose runs share one seed
                values["seed"] = (run.config or {}).get("seed") if run.exists() else None
            label = ", ".join(f"{a}={fmt_value(values.get(a))}" for a in arm_axes)
            ident = {"run_id": entry["run_id"], "arm": label or "all runs",
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


def run_records(out: str | Path) -> list[dict[str, Any]]:
    store = _open(out)
    records = []
    for run, ident in _identities(store):
        stored = run.read_json("config.json") if run.exists() else None
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
        for row in run.metrics():
            for k, v in row.items():
                if k not in ("epoch", "step"):
                    records.append({**ident, "epoch": row.get("epoch"), "step": row.get("step"),
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
