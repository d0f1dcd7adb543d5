"""Studies from Python: `bnlab study run|status|report|list`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bnlab.api import checks
from bnlab.api.frames import frame
from bnlab.errors import StorageError, UserError
from bnlab.store import Store
from bnlab.study import spec as specs
from bnlab.study import status as statuses
from bnlab.study.expand import Plan, expand
from bnlab.study.options import EXECUTORS, SlurmOptions
from bnlab.study.preflight import preflight
from bnlab.study.runner import run_study, unfinished
from bnlab.study.worker import prepare_machine

Folder = str | Path


def _pairs(items, flag: str) -> list[tuple[str, Any]]:
    """--set/--only from Python: a dict {key: value} (for --only a list of values keeps any of
    them), or the command line's "key=value" strings."""
    checks.assignments(flag.lstrip("-"), items, lists=flag == "--only")
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
    checks.data_map(items)
    if isinstance(items, dict):
        items = [f"{k}={v}" for k, v in items.items()]
    elif isinstance(items, str):
        items = [items]
    return specs.parse_data_map(list(items or []))


class Counts(dict):
    """{status: count} of a study's runs; `unfinished` counts those without a result (failed,
    interrupted, pending, or running elsewhere): `bnlab study run` exits 1 when any."""

    @property
    def unfinished(self) -> int:
        return unfinished(self)


class Study:
    """A study expanded into its runs (a Plan), and the folder it runs into."""

    def __init__(self, plan: Plan, out: Folder | None = None):
        self.plan = plan
        self.out: Path | None = checks.folder("out", out, optional=True)

    @classmethod
    def from_spec(cls, spec: str | Path | dict, *, set=None, only=None, data_map=None,
                  device: str | None = None, tensorboard: bool = False,
                  out: Folder | None = None, seeds: int | None = None) -> Study:
        """A built-in study name, a TOML path or a dict of the TOML's tables, with the command
        line's --set (`set`), --only, --data-map, --device, --tensorboard and --seeds (seeds
        0 .. seeds-1 in place of the spec's seed axis)."""
        tensorboard = checks.flag("tensorboard", tensorboard)
        out = checks.folder("out", out, optional=True)
        if isinstance(spec, dict):
            checks.toml_value("the spec", spec)
            name = spec.get("name", "study")
            sp = specs.parse_spec(json.loads(json.dumps(spec)), source="table",
                                  default_name=name if isinstance(name, str) else "study")
        elif isinstance(spec, str | Path) and str(spec):
            sp = specs.load_spec(str(spec))
        else:
            raise UserError(f"a study spec is a built-in name, a .toml path or a dict, got "
                            f"{checks.shown(spec)}")
        if seeds is not None:
            sp = specs.with_seeds(sp, seeds)
        sets = _pairs(set, "--set")
        if device is not None:
            sets.append(specs.coerce("device", checks.text("device", device), "--device"))
        if tensorboard:
            sets.append(("tensorboard", True))
        plan = expand(sp, sets, _pairs(only, "--only"), _data_map(data_map))
        return cls(plan, out)

    @classmethod
    def from_folder(cls, out: Folder) -> Study:
        """The study whose results `out` holds, expanded again from its study.json."""
        folder = statuses.resolve_out(str(checks.folder("out", out)))
        return cls(specs.plan_of_study_json(Store(folder).read_meta("study.json")), folder)

    @property
    def name(self) -> str:
        return self.plan.spec.name

    @property
    def runs(self):
        """The planned runs: run_id and the value of every varying axis, one row each."""
        return frame([{"run_id": r.run_id, **r.values} for r in self.plan.runs], ["run_id"])

    def run(self, jobs: int | str = "auto", out: Folder | None = None, pack: bool = True,
            executor: str = "local", slurm: SlurmOptions | dict | None = None,
            log: bool = True, pack_cpu: bool = False, yes: bool = False) -> Counts:
        """`bnlab study run`: every run not finished yet (resumable, same folders), then the
        study's analysis (prediction comparison); returns {status: count}. log=False: a
        progress bar and no lines (a notebook kept quiet). First the estimate of the runs left
        (printed with log); more runs than the spec's max_runs (default 1000) are refused
        unless `yes`. pack_cpu: pack CPU runs too (the GPU path at tiny sizes)."""
        if jobs != "auto" and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
            raise UserError(f"jobs must be an integer >= 1 or 'auto', got {checks.shown(jobs)}")
        pack = checks.flag("pack", pack)
        log = checks.flag("log", log)
        pack_cpu = checks.flag("pack_cpu", pack_cpu)
        yes = checks.flag("yes", yes)
        executor = checks.choice("executor", executor, EXECUTORS)
        out = checks.folder("out", out, optional=True)
        options = None
        if executor != "local":
            if not isinstance(slurm, SlurmOptions | dict | None):
                raise UserError(f"slurm must be a SlurmOptions or a dict of its fields, got "
                                f"{checks.shown(slurm)}")
            if isinstance(slurm, dict):
                fields = set(SlurmOptions.__dataclass_fields__)
                for k, v in slurm.items():
                    if k not in fields:
                        raise UserError(f"unknown slurm option {k!r}; accepted: "
                                        f"{', '.join(sorted(fields))}")
                    if k in ("partition", "account") and not isinstance(v, str):
                        raise UserError(f"slurm {k} must be a string, got {checks.shown(v)}")
                    if k not in ("partition", "account", "extra"):
                        checks.integer(f"slurm {k}", v, 0)
            options = (slurm if isinstance(slurm, SlurmOptions)
                       else SlurmOptions(**(slurm or {}))).validate()
        preflight(self.plan)
        if out is not None:
            self.out = out
        elif self.out is None:
            self.out = specs.DEFAULT_ROOT / self.name
        if executor == "local":  # the first study on this machine: kernels and data at once
            prepare_machine([r.cfg for r in self.plan.all_runs])
        if self.plan.asks_auto_precision:
            self.plan = statuses.resolve_auto_precision(self.plan, self.out, jobs,
                                                        print if log else None)
        line, todo = statuses.plan_estimate(self.plan, self.out, jobs,
                                            print if log else None)
        if log:
            print(line, flush=True)  # before anything starts, and before a refusal
        statuses.confirm_size(self.plan, todo, yes)
        counts = run_study(self.plan, self.out, jobs=jobs, pack=pack, executor=executor,
                           options=options, quiet=not log, pack_cpu=pack_cpu)
        from bnlab.report.analysis import compare_selected  # the report's stack: on use

        compare_selected(self.out)
        return Counts(counts)

    def status(self):
        """`bnlab study status`: one row per run with its axis values, status and results."""
        if self.out is None:
            raise UserError(f"study {self.name!r} has no output folder yet: run it first, or "
                            "pass out= to Study.from_spec")
        return study_status(self.out)

    def report(self) -> dict[str, Path]:
        """`bnlab study report`: report.html, report.md, figures and tables/*.csv."""
        if self.out is None:
            raise UserError(f"study {self.name!r} has no output folder yet: run it first, or "
                            "pass out= to Study.from_spec")
        return write_report(self.out)


def _resolve(target: Folder, out: Folder | None) -> Path:
    target = checks.folder("target", target)
    out = checks.folder("out", out, optional=True)
    return statuses.resolve_out(str(target), None if out is None else str(out))


def study_status(target: Folder, out: Folder | None = None, *, records: bool = False):
    """`bnlab study status --format json`: one row per run with its axis values, status and
    results. `target` is the study's folder or its spec (then `out`, else
    studies-out/<name>); records=True: the list of dicts (no pandas needed)."""
    rows = statuses.status_records(_resolve(target, out))[2]
    return rows if checks.flag("records", records) else frame(rows)


def study_status_text(target: Folder, out: Folder | None = None) -> str:
    """`bnlab study status`: counts by status and one line per run."""
    return statuses.status_text(_resolve(target, out))


def write_report(target: Folder, out: Folder | None = None, report_dir: Folder | None = None,
                 references: Folder | None = None) -> dict[str, Path]:
    """`bnlab study report SPEC|DIR`: the report of a study's folder (or of a study name's
    default folder, studies-out/<name>) into `report_dir` (default: OUT/report), with the
    published numbers of `references` (TOML) beside the study's; returns the files by name."""
    folder = _resolve(target, out)
    report_dir = checks.folder("report_dir", report_dir, optional=True)
    references = checks.folder("references", references, optional=True)
    from bnlab.report import write_report as report_to  # matplotlib, scipy: on use

    try:
        return report_to(folder, None if report_dir is None else str(report_dir),
                         None if references is None else str(references))
    except StorageError as e:
        if report_dir is not None:
            raise
        raise StorageError(f"{e} (write the report elsewhere with --report-dir DIR)") from None
