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
    studies.py    Study, study status, write_report
    catalog.py    list_studies (without torch: `bnlab study list` stays fast)
    results.py    load_runs, load_metrics, load_probes
    inference.py  compare, diagnose, fold, recalibrate, UserModel
    tools.py      list_datasets, list_models, list_norms, norm_output_table, bench_speed

Each name is imported from its module on first use (PEP 562), so that a command that needs
no torch (`bnlab study list`) does not load it.
"""

from __future__ import annotations

import importlib

# each public name -> the module that defines it
_HOME = {
    "bnlab.api.catalog": ("list_studies",),
    "bnlab.api.inference": ("Comparison", "Diagnosis", "Folding", "UserModel", "compare",
                            "diagnose", "fold", "recalibrate"),
    "bnlab.api.results": ("load_metrics", "load_probes", "load_runs"),
    "bnlab.api.runs": ("LaunchFailed", "Run", "rebuild_index", "run_rows", "train_run"),
    "bnlab.api.studies": ("Counts", "Study", "study_status", "study_status_text",
                          "write_report"),
    "bnlab.api.tools": ("bench_speed", "list_datasets", "list_models", "list_norms",
                        "model_families", "norm_output_table"),
    "bnlab.errors": ("UserError",),
    "bnlab.models.entry": ("NormFactory",),
}
_MODULE = {name: module for module, names in _HOME.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str):
    if name in _MODULE:
        return getattr(importlib.import_module(_MODULE[name]), name)
    raise AttributeError(f"module 'bnlab.api' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
