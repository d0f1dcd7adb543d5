"""The results of an output folder (a study's or `bnlab train`'s) as DataFrames: the records of
bnlab/report/records.py, the same that `bnlab runs --format csv` writes, with their dtypes."""

from __future__ import annotations

from pathlib import Path

from bnlab.api import checks
from bnlab.api.frames import frame
from bnlab.api.frames import wide as wide_frame
from bnlab.api.studies import Study
from bnlab.errors import UserError
from bnlab.report.records import metric_records, probe_records, run_records


def _folder(out) -> Path:
    if isinstance(out, Study):
        if out.out is None:
            raise UserError(f"study {out.name!r} has no output folder yet: run it first, or "
                            "pass out= to Study.from_spec")
        return out.out
    return checks.folder("out", out)


def load_runs(out, *, records: bool = False):
    """One row per run: run_id, (in a study) arm, dataset, seed and axes, then status and
    results, then every config option (bnlab/report/records.py). records=True: the list of
    dicts behind the frame (what `bnlab runs --format csv|json` writes; no pandas needed)."""
    rows = run_records(_folder(out))
    return rows if checks.flag("records", records) else frame(rows, ["run_id", "status"])


def load_metrics(out, *, wide: bool = False):
    """Long format: one row per run, epoch and metric of metrics.jsonl (identity columns,
    epoch, step, metric, value). wide=True: one row per run and epoch, the metrics as
    columns in the run folder's order."""
    rows = metric_records(_folder(out))
    if checks.flag("wide", wide):
        return wide_frame(rows)
    return frame(rows, ["run_id", "epoch", "step", "metric", "value"])



def load_probes(out):
    """Long format: one row per probe value (identity columns, step, epoch, layer, metric,
    unit, value; unit is the feature or channel of a per-unit row, an integer; missing for a
    pooled one); empty when no run recorded probes."""
    return frame(probe_records(_folder(out)),
                 ["run_id", "step", "epoch", "layer", "metric", "unit", "value"])
