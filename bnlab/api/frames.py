"""Records as pandas DataFrames with the dtypes their values have: a column of whole numbers
is an integer column (pandas' nullable Int64 where some rows have none, e.g. `unit` of pooled
probe rows), a column of flags is bool (nullable boolean where some rows have none), a column
of measurements is float64 even when every row is empty (`val_acc` of runs without a
validation split), text stays text."""

from __future__ import annotations

from collections.abc import Iterable

from bnlab.errors import UserError

# the columns of metrics.jsonl in the order the run folder documents (docs/api.md); others
# a loop adds come after them in the order they first appear
METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
                  "test_acc5", "val_loss", "val_acc", "epoch_time", "train_images_per_s")
# measurements: float64 whatever the rows hold (a result not recorded is NaN)
FLOAT_COLUMNS = {"test_acc", "test_loss", "train_acc", "train_loss", "val_acc", "val_loss",
                 "test_acc5", "lr", "epoch_time", "train_images_per_s", "wall_time", "value"}


def pandas():
    try:
        import pandas as pd  # optional: the pandas extra
    except ImportError:
        raise UserError("DataFrames need pandas (pip install 'bnlab[pandas]')") from None
    return pd


def _kind(values: list) -> str | None:
    present = [v for v in values if v is not None and v == v]  # NaN != NaN
    if not present:
        return None
    if all(isinstance(v, bool) for v in present):
        return "boolean"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return "Int64"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return "float64"
    return None


def frame(records: list[dict], columns: Iterable[str] = (), first: Iterable[str] = ()):
    """A DataFrame of `records`, each column with the dtype of its values: the columns in
    order of first appearance, after those named in `first`; `columns` when there are no
    records."""
    pd = pandas()
    columns = list(columns)
    order = list(dict.fromkeys([*first, *(k for r in records for k in r)]))
    df = pd.DataFrame.from_records(records, columns=order if records else columns)
    for name in df.columns:
        values = [r.get(name) for r in records]
        kind = "float64" if name in FLOAT_COLUMNS else _kind(values)
        if kind is None:
            continue
        if kind == "float64":
            df[name] = pd.to_numeric(df[name], errors="coerce").astype("float64")
        elif kind in ("Int64", "boolean") and all(v is not None and v == v for v in values):
            df[name] = df[name].astype("int64" if kind == "Int64" else "bool")
        else:
            df[name] = df[name].astype(kind)
    return df


def metric_frame(rows: list[dict]):
    """metrics.jsonl rows: one row per epoch, columns in METRIC_COLUMNS order."""
    present = {k for r in rows for k in r}
    return frame(rows, ["epoch"], [c for c in METRIC_COLUMNS if c in present])


def wide(records: list[dict]):
    """Long metric records (identity, epoch, step, metric, value) as one row per run and
    epoch with the metrics as columns, in METRIC_COLUMNS order."""
    rows: dict[tuple, dict] = {}
    for r in records:
        ident = {k: v for k, v in r.items() if k not in ("metric", "value")}
        key = (r["run_id"], r["epoch"])
        rows.setdefault(key, ident)[r["metric"]] = r["value"]
    ident_cols = [k for k in (records[0] if records else {"run_id": 0, "epoch": 0, "step": 0})
                  if k not in ("metric", "value")]
    metrics = {r["metric"] for r in records}
    ordered = [c for c in METRIC_COLUMNS if c in metrics]
    order = [*ident_cols, *ordered, *sorted(metrics - set(ordered))]
    return frame(list(rows.values()), order, order)
