"""bnlab from Python: what the `bnlab` command does, for notebooks and scripts.

    train_run(dataset=..., model=..., norm=..., epochs=..., out="runs", **options) -> Run
    Study.from_spec(spec, set=..., only=..., data_map=...)   a built-in name, TOML path or dict
    Study.from_folder(out)                                   the study a folder holds
    study.run(jobs=1, out=None) -> {status: count}           the runner, then its analysis
    study.status() -> DataFrame, study.report() -> {file name: path}
    load_runs(out), load_metrics(out), load_probes(out) -> DataFrame
    write_report(out), list_studies(), compare(...), diagnose(...), fold(...), bench_speed(...)

Every function checks its arguments with the same code as the command line, so a mistake raises
the same one-line bnlab.UserError the command prints. Results are pandas DataFrames (the
optional `pandas` extra); the records behind them are bnlab/report/records.py's, the same that
`bnlab runs --format csv` writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab.bench import BenchArgs, check_args, run_all
from bnlab.config import RunConfig, load, to_flags
from bnlab.errors import UserError
from bnlab.infer.compare import compare_runs
from bnlab.infer.diagnose import diagnose as diagnose_model
from bnlab.infer.fold_report import fold_command
from bnlab.infer.loading import load_model
from bnlab.models.entry import NormFactory
from bnlab.report import write_report as report_to
from bnlab.report.analysis import compare_selected
from bnlab.report.records import metric_records, probe_records, run_records
from bnlab.store import RunDir, Store
from bnlab.study import spec as specs
from bnlab.study import status as study_status
from bnlab.study.options import SlurmOptions
from bnlab.study.runner import run_study
from bnlab.train import train_run as train_config
from bnlab.train.distributed import detect, launch

Folder = str | Path


def _frame(records: list[dict], columns: Iterable[str] = ()):
    """A DataFrame of `records` (columns in order of first appearance; `columns` when empty)."""
    try:
        import pandas as pd  # optional: the pandas extra
    except ImportError:
        raise UserError("DataFrames need pandas (pip install 'bnlab[pandas]')") from None
    return pd.DataFrame.from_records(records, columns=None if records else list(columns))


def _folder(out: Folder | Study) -> Path:
    if isinstance(out, Study):
        if out.out is None:
            raise UserError(f"study {out.name!r} has no output folder yet: run it first, or "
                            "pass out= to Study.from_spec")
        return Path(out.out)
    return Path(out)


# -- one run -----------------------------------------------------------------------------------
@dataclass
class Run:
    """A trained (or refused, failed, resumed) run: its folder and stored results."""

    run_id: str
    path: Path
    summary: dict
    config: dict

    @classmethod
    def open(cls, path: Folder) -> Run:
        run = RunDir(Path(path))
        if not run.exists():
            raise UserError(f"{str(path)!r} is not a run folder (no config.json)")
        return cls(run.run_id, run.path, run.summary or {}, run.config)

    @property
    def status(self) -> str:
        return self.summary.get("status", "running")

    @property
    def test_acc(self) -> float | None:
        return self.summary.get("test_acc")

    def metrics(self):
        """metrics.jsonl as a DataFrame: one row per epoch (epoch, step, lr, train_loss, ...)."""
        return _frame(RunDir(self.path).metrics(), ["epoch"])

    def probes(self):
        """probes.jsonl as a DataFrame: step, epoch, layer, metric, value (empty without
        probes)."""
        return _frame(RunDir(self.path).read_rows("probes.jsonl"),
                      ["step", "epoch", "layer", "metric", "value"])


def train_run(dataset: str | None = None, model: str | None = None, norm: str | None = None,
              epochs: int | None = None, *, out: Folder = "runs", config: Folder | None = None,
              resume: bool = False, nproc: int = 0, log: Callable[[str], None] = print,
              **options: Any) -> Run:
    """`bnlab train`: one run into OUT/<run_id>/. Options are RunConfig's fields (`bnlab train
    --help`), over the TOML file `config` when given; nproc > 0 trains data-parallel under
    torchrun like --nproc."""
    named = {"dataset": dataset, "model": model, "norm": norm, "epochs": epochs}
    cfg = load(config, {**{k: v for k, v in named.items() if v is not None}, **options})
    if nproc:
        rc = launch(nproc, _train_argv(cfg, out, resume), cfg)
        if rc != 0:
            raise RuntimeError(f"torchrun exited with status {rc} (its processes' output "
                               "says why)")
        return Run.open(Path(out) / cfg.run_id())
    summary = train_config(cfg, out, resume=resume, log=log)
    run = Store(out).run(cfg.run_id())
    if not detect().is_main:  # a process other than rank 0 under torchrun: nothing written
        return Run(cfg.run_id(), run.path, summary, cfg.to_dict())
    return Run(cfg.run_id(), run.path, summary, run.config or cfg.to_dict())


def _train_argv(cfg: RunConfig, out: Folder, resume: bool) -> list[str]:
    """`bnlab train` arguments that rebuild `cfg` in the processes torchrun starts."""
    return ["--out", str(out)] + (["--resume"] if resume else []) + to_flags(cfg.to_dict())


# -- studies -----------------------------------------------------------------------------------
def _pairs(items, flag: str) -> list[tuple[str, Any]]:
    """--set/--only from Python: a dict {key: value} (for --only a list of values keeps any of
    them), or the command line's "key=value" strings."""
    if items is None:
        return []
    if isinstance(items, dict):
        out = []
        for k, v in items.items():
            values = v if flag == "--only" and isinstance(v, list | tuple) else [v]
            out += [specs.coerce(str(k), x, flag) for x in values]
        return out
    return specs.parse_assignments([items] if isinstance(items, str) else list(items), flag)


def _data_map(items) -> dict[str, str]:
    if isinstance(items, dict):
        items = [f"{k}={v}" for k, v in items.items()]
    elif isinstance(items, str):
        items = [items]
    return specs.parse_data_map(list(items or []))


class Study:
    """A study expanded into its runs (a Plan), and the folder it runs into."""

    def __init__(self, plan: specs.Plan, out: Folder | None = None):
        self.plan = plan
        self.out: Path | None = Path(out) if out is not None else None

    @classmethod
    def from_spec(cls, spec: str | Path | dict, *, set=None, only=None, data_map=None,
                  device: str | None = None, tensorboard: bool = False,
                  out: Folder | None = None) -> Study:
        """A built-in study name, a TOML path or a dict of the TOML's tables, with the command
        line's --set (`set`), --only, --data-map, --device and --tensorboard."""
        if isinstance(spec, dict):
            name = spec.get("name", "study")
            sp = specs.parse_spec(json.loads(json.dumps(spec)), source="table",
                                  default_name=name if isinstance(name, str) else "study")
        elif isinstance(spec, str | Path):
            sp = specs.load_spec(str(spec))
        else:
            raise UserError(f"a study spec is a built-in name, a .toml path or a dict, got "
                            f"{type(spec).__name__}")
        sets = _pairs(set, "--set")
        if device is not None:
            sets.append(specs.coerce("device", device, "--device"))
        if tensorboard:
            sets.append(("tensorboard", True))
        plan = specs.expand(sp, sets, _pairs(only, "--only"), _data_map(data_map))
        return cls(plan, out)

    @classmethod
    def from_folder(cls, out: Folder) -> Study:
        """The study whose results `out` holds, expanded again from its study.json."""
        folder = study_status.resolve_out(str(out))
        meta = Store(folder).read_meta("study.json")
        sp = specs.parse_spec(meta["spec"], source="table", default_name=meta["name"])
        plan = specs.expand(sp, _pairs(meta.get("sets") or {}, "--set"),
                            _pairs(meta.get("only") or {}, "--only"),
                            dict(meta.get("data_map") or {}))
        return cls(plan, folder)

    @property
    def name(self) -> str:
        return self.plan.spec.name

    @property
    def runs(self):
        """The planned runs: run_id and the value of every varying axis, one row each."""
        return _frame([{"run_id": r.run_id, **r.values} for r in self.plan.runs], ["run_id"])

    def run(self, jobs: int = 1, out: Folder | None = None, pack: bool = True,
            executor: str = "local", slurm: SlurmOptions | dict | None = None,
            pack_cpu: bool = False) -> dict[str, int]:
        """`bnlab study run`: every run not finished yet (resumable, same folders), then the
        study's analysis (prediction comparison); returns {status: count}."""
        specs.preflight(self.plan)
        if out is not None:
            self.out = Path(out)
        elif self.out is None:
            self.out = specs.DEFAULT_ROOT / self.name
        options = None
        if executor != "local":
            options = (slurm if isinstance(slurm, SlurmOptions)
                       else SlurmOptions(**(slurm or {}))).validate()
        counts = run_study(self.plan, self.out, jobs=jobs, pack=pack, executor=executor,
                           options=options, pack_cpu=pack_cpu)
        compare_selected(self.out)
        return counts

    def status(self):
        """`bnlab study status`: one row per run with its axis values, status and results."""
        folder = study_status.resolve_out(str(_folder(self)))
        return _frame(study_status.status_records(folder)[2])

    def report(self) -> dict[str, Path]:
        """`bnlab study report`: report.html, report.md, figures and tables/*.csv."""
        return write_report(_folder(self))


def write_report(target: Folder) -> dict[str, Path]:
    """`bnlab study report SPEC|DIR`: the report of a study's folder (or of a study name's
    default folder, studies-out/<name>); returns the written files by name."""
    return report_to(study_status.resolve_out(str(target)))


def list_studies():
    """`bnlab study list`: the built-in studies with their runs and estimated minutes."""
    rows = []
    for name in specs.builtin_names():
        sp = specs.load_spec(name)
        rows.append({"study": name, "runs": len(specs.expand(sp).runs),
                     "cpu_minutes": sp.estimate.get("cpu_minutes"),
                     "gpu_minutes": sp.estimate.get("gpu_minutes"),
                     "description": sp.description})
    return _frame(rows)


# -- results as DataFrames ---------------------------------------------------------------------
def load_runs(out: Folder | Study):
    """One row per run: run_id, (in a study) arm, dataset, seed and axes, then status and
    results, then every config option (bnlab/report/records.py)."""
    return _frame(run_records(_folder(out)), ["run_id", "status"])


def load_metrics(out: Folder | Study):
    """Long format: one row per run, epoch and metric of metrics.jsonl (identity columns,
    epoch, step, metric, value)."""
    return _frame(metric_records(_folder(out)), ["run_id", "epoch", "step", "metric", "value"])


def load_probes(out: Folder | Study):
    """Long format: one row per probe value (identity columns, step, epoch, layer, metric,
    unit, value; unit is the feature or channel of a per-unit row, None for a pooled one);
    empty when no run recorded probes."""
    return _frame(probe_records(_folder(out)),
                  ["run_id", "step", "epoch", "layer", "metric", "unit", "value"])


# -- inference tools ---------------------------------------------------------------------------
def compare(runs: Iterable[Folder], out: Folder | None = None, labels: list[str] | None = None,
            data_dir: str | None = None, device: str = "cpu", corruptions: bool = True,
            log: Callable[[str], None] | None = None) -> dict:
    """`bnlab compare`: compare.json's content, written with its figures to `out` (default:
    the first run's output root /analysis); `log` gets each progress line (default: none)."""
    paths = [Path(r) for r in runs]
    if not paths:
        raise UserError("compare needs at least one run folder (two or more to compare)")
    dirs = [RunDir(p.parent if p.is_file() else p) for p in paths]
    for d, p in zip(dirs, paths):
        if not d.exists():
            raise UserError(f"{str(p)!r} is not a run folder (no config.json)")
    folder = Path(out) if out is not None else dirs[0].path.parent / "analysis"
    return compare_runs(dirs, folder, labels, data_dir=data_dir, device=device,
                        corruptions=corruptions, log=log or (lambda m: None))


def diagnose(checkpoint: Folder, batch_sizes: Iterable[int] = (1, 2, 8, 32, 128, 1000),
             precise_batches: int = 100, max_images: int = 0, data_dir: str | None = None,
             device: str = "cpu") -> dict:
    """`bnlab diagnose`: BN at inference (train vs eval mode, batch-size dependence, PreciseBN,
    statistics checks) as a dict, also written to the run folder's diagnose.json."""
    sizes = list(batch_sizes)
    if not sizes or not all(isinstance(b, int) and b > 0 for b in sizes):
        raise UserError(f"batch_sizes must be positive integers, got {sizes!r}")
    for name, v in (("precise_batches", precise_batches), ("max_images", max_images)):
        if not isinstance(v, int) or v < 0:
            raise UserError(f"{name} must be an integer >= 0, got {v!r}")
    loaded = load_model(checkpoint, data_dir, device)
    res = diagnose_model(loaded, sizes, precise_batches, max_images, log=lambda m: None)
    if loaded.run_dir is not None:
        loaded.run_dir.write_json("diagnose.json", res)
    return res


def fold(checkpoint: Folder, onnx: Folder | None = None, data_dir: str | None = None,
         device: str = "cpu", repeats: int = 20) -> bool:
    """`bnlab fold`: prints the fold report as the command does and writes fold.json beside
    the checkpoint; True when the folded model's logits match the unfolded model's."""
    if not isinstance(repeats, int) or repeats < 1:
        raise UserError(f"repeats must be an integer >= 1, got {repeats!r}")
    loaded = load_model(checkpoint, data_dir, device)
    return fold_command(loaded, str(onnx) if onnx else None, repeats) == 0


def bench_speed(variants: Iterable[str] = ("textbook", "eager", "compiled", "packed"),
                precisions: Iterable[str] = ("fp32",), timeout: float = 1800,
                out: Folder | None = None, log: Callable[[str], None] = print,
                **options: Any):
    """`bnlab bench`: images/s of each variant, one row each (`log` gets each row's JSON line
    as it is measured); `options` are BenchArgs fields (data, model, batch_size, steps, k,
    device, workers, ...)."""
    fields = {f.name for f in dataclasses.fields(BenchArgs)}
    for k in options:
        if k not in fields:
            raise UserError(f"unknown bench option {k!r}; accepted: {', '.join(sorted(fields))}")
    a = BenchArgs(**options)
    variants, precisions = list(variants), list(precisions)
    check_args(a, variants, precisions, timeout)
    return _frame(run_all(a, variants, precisions, timeout, log, str(out) if out else None))


__all__ = ["NormFactory", "Run", "Study", "UserError", "bench_speed", "compare", "diagnose", "fold",
           "list_studies", "load_metrics", "load_probes", "load_runs", "train_run",
           "write_report"]
