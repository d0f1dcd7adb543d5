"""bnlab: batch-normalization studies with real training runs and measured reports.

The Python API (bnlab/api/, docs/api.md) is reached from here, loaded on first use:
`import bnlab` and `import bnlab.errors` stay free of torch, which takes seconds to load.
"""

__version__ = "0.1.0"

API = ("Comparison", "Counts", "Diagnosis", "Folding", "LaunchFailed", "NormFactory", "Run",
       "Study",
       "UserModel", "bench_speed", "compare", "diagnose", "fold", "list_datasets",
       "list_models", "list_norms", "list_studies", "load_metrics", "load_probes", "load_runs",
       "model_families", "norm_output_table", "rebuild_index", "recalibrate", "run_rows",
       "study_status", "study_status_text", "train_run", "write_report")


def __getattr__(name: str):
    # PEP 562: only the API's names; anything else (a sub-package not imported yet) must raise
    # AttributeError so that `from bnlab import cli` falls back to importing the module
    if name == "UserError":
        from bnlab.errors import UserError

        return UserError
    if name in API:
        from bnlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'bnlab' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *API, "UserError"])
