"""bnlab from Python: what the `bnlab` command does, for notebooks and scripts (docs/api.md).

    train_run(dataset=..., model=..., norm=..., epochs=..., out="runs", **options) -> Run
    Study.from_spec(spec, set=..., only=..., data_map=...)   a built-in name, TOML path or dict
    Study.from_folder(out)                                   the study a folder holds
    study.run(jobs=1, out=None, log=True) -> {status: count} the runner, then its analysis
    study.status() -> DataFrame, study.report() -> {file name: path}
    load_runs(out), load_metrics(out, wide=False), load_probes(out) -> DataFrame
    compare(models, data), diagnose(model, data), fold(model, example_input),
    recalibrate(model, loader) -> a copy with recomputed BN statistics
    write_report(out), list_studies(), bench_speed(...), list_datasets(), list_models(), ...

This package is the one place where the command's operations are put together and their
arguments checked: the `bnlab` command (bnlab/cli/) parses its flags, calls these functions
and prints what they return. A mistake raises bnlab.UserError with the one line the command
prints after `bnlab: error:`. Results are pandas DataFrames (the optional `pandas` extra).

    checks.py     argument checks: one-line UserErrors before any work
    frames.py     records -> DataFrames with their dtypes; metrics.jsonl's column order
    runs.py       train_run, Run, the runs of an output folder (`bnlab runs`)
    studies.py    Study, study status, write_report, list_studies
    results.py    load_runs, load_metrics, load_probes
    inference.py  compare, diagnose, fold, recalibrate, UserModel
    tools.py      list_datasets, list_models, list_norms, norm_output_table, bench_speed
"""

from bnlab.api.inference import (
    Comparison,
    Diagnosis,
    Folding,
    UserModel,
    compare,
    diagnose,
    fold,
    recalibrate,
)
from bnlab.api.results import load_metrics, load_probes, load_runs
from bnlab.api.runs import LaunchFailed, Run, rebuild_index, run_rows, train_run
from bnlab.api.studies import (
    Counts,
    Study,
    list_studies,
    study_status,
    study_status_text,
    write_report,
)
from bnlab.api.tools import (
    bench_speed,
    list_datasets,
    list_models,
    list_norms,
    model_families,
    norm_output_table,
)
from bnlab.errors import UserError
from bnlab.models.entry import NormFactory

__all__ = ["Comparison", "Counts", "Diagnosis", "Folding", "LaunchFailed", "NormFactory", "Run",
           "Study",
           "UserError", "UserModel", "bench_speed", "compare", "diagnose", "fold",
           "list_datasets", "list_models", "list_norms", "list_studies", "load_metrics",
           "load_probes", "load_runs", "model_families", "norm_output_table", "rebuild_index",
           "recalibrate", "run_rows", "study_status", "study_status_text", "train_run",
           "write_report"]
