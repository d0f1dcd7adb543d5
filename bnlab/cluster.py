"""Study runs on a SLURM cluster through submitit: one job-array task per run.

Each task calls the study's unit of work, `run_one(cfg, out)` (bnlab/study.py), which trains,
resumes or skips the run and stores its result in the same output root as a local study, so a
grid can be started on the cluster and finished locally, or submitted again after a failure:
finished runs are not submitted, interrupted ones resume from their last epoch's checkpoint.
A task that SLURM preempts or stops at its time limit is requeued by submitit (the task is
`Checkpointable`) and continues from that checkpoint.

With `gpus_per_run` > 1 a run is data-parallel: SLURM starts one task per GPU on one node,
submitit exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, and every task
calls `train_run` itself (bnlab/distributed.py reads that environment; rank 0 decides whether
the run is new, resumed or finished and tells the others, and alone writes the store). The
array gives each run to exactly one job, so no lock is needed there.

Tests use submitit's local executor (`cluster="local"`): the same pickled tasks, run as local
processes instead of SLURM jobs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bnlab.config import RunConfig, from_json_dict
from bnlab.errors import UserError

FINAL = ("completed", "diverged", "no_learning")
RUN_ONE = "bnlab.study:run_one"
CLUSTERS = ("slurm", "local")


@dataclass(frozen=True)
class SlurmOptions:
    """Resources of one run; `time` in minutes, `mem_gb` in GB (0 = the partition's default)."""

    partition: str = ""
    gpus_per_run: int = 1
    cpus_per_gpu: int = 8
    time: int = 24 * 60
    mem_gb: int = 0
    parallel: int = 0  # runs at a time (SLURM's array throttle, %N); 0 = no limit
    account: str = ""
    extra: dict = field(default_factory=dict)  # further #SBATCH options, e.g. {"qos": "high"}

    def validate(self) -> SlurmOptions:
        for name in ("gpus_per_run", "cpus_per_gpu", "time"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got "
                                f"{getattr(self, name)}")
        for name in ("mem_gb", "parallel"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got "
                                f"{getattr(self, name)}")
        return self

    def parameters(self, cluster: str) -> dict:
        """submitit parameters (slurm_* names are passed only to the SLURM executor)."""
        g = self.gpus_per_run
        p: dict = {"timeout_min": self.time, "nodes": 1, "tasks_per_node": g,
                   "cpus_per_task": self.cpus_per_gpu}
        if cluster == "local":
            return p
        p["gpus_per_node"] = g
        if self.partition:
            p["slurm_partition"] = self.partition
        if self.mem_gb:
            p["mem_gb"] = self.mem_gb
        if self.parallel:
            p["slurm_array_parallelism"] = self.parallel
        if self.account:
            p["slurm_account"] = self.account
        if self.extra:
            p["slurm_additional_parameters"] = dict(self.extra)
        return p


def resolve(target: str) -> Callable:
    """'package.module:function' -> the function (importable by name, so tasks pickle small)."""
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UserError(f"cannot import {target!r} (expected package.module:function)") from None


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("--executor slurm needs the submitit package (pip install "
                        "submitit)") from None
    return submitit


class RunTask:
    """The callable a job runs: one run into `out`. Requeued with the same arguments when
    SLURM preempts it or its time runs out (submitit calls `checkpoint`)."""

    def __init__(self, run_one: str = RUN_ONE):
        self.run_one = run_one

    def __call__(self, cfg_dict: dict, out: str) -> dict:
        submitit = _submitit()
        cfg = from_json_dict(cfg_dict)
        env = submitit.JobEnvironment() if _in_job() else None
        if env is not None and env.num_tasks > 1:
            # one process per GPU: the run is data-parallel (bnlab/distributed.py)
            from bnlab.train import train_run

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            return train_run(cfg, out, resume=True)
        return resolve(self.run_one)(cfg, Path(out))

    def checkpoint(self, cfg_dict: dict, out: str):
        # the run's own per-epoch checkpoint is the state; the requeued task resumes from it
        return _submitit().helpers.DelayedSubmission(RunTask(self.run_one), cfg_dict, out)


def _in_job() -> bool:
    import os

    return "SUBMITIT_EXECUTOR" in os.environ or "SLURM_JOB_ID" in os.environ


class SlurmExecutor:
    """Submits the unfinished runs of a study as one job array and waits for their summaries."""

    def __init__(self, folder: str | Path, options: SlurmOptions | None = None,
                 cluster: str = "slurm", run_one: str = RUN_ONE):
        if cluster not in CLUSTERS:
            raise UserError(f"cluster {cluster!r} is not accepted; accepted: "
                            f"{', '.join(CLUSTERS)}")
        self.folder = Path(folder)
        self.options = (options or SlurmOptions()).validate()
        self.cluster, self.run_one = cluster, run_one
        resolve(run_one)  # fail now, not in every job

    def _executor(self):
        submitit = _submitit()
        ex = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster=self.cluster)
        ex.update_parameters(name="bnlab", **self.options.parameters(self.cluster))
        return ex

    def pending(self, cfgs: Sequence[RunConfig], out: str | Path) -> list[RunConfig]:
        """The runs that still need work (not finished in `out`)."""
        from bnlab.store import Store

        store = Store(out)
        return [c for c in cfgs
                if (store.run(c.run_id()).summary or {}).get("status") not in FINAL]

    def submit(self, cfgs: Sequence[RunConfig], out: str | Path) -> list:
        """One array task per unfinished run; returns the submitit jobs (maybe none)."""
        todo = self.pending(cfgs, out)
        if not todo:
            return []
        ex = self._executor()
        task = RunTask(self.run_one)
        out_s = str(Path(out).resolve())
        with ex.batch():
            jobs = [ex.submit(task, c.to_dict(), out_s) for c in todo]
        return jobs

    def run(self, cfgs: Sequence[RunConfig], out: str | Path,
            log: Callable[[str], None] = print) -> list[dict]:
        """Submit and wait. On SLURM the whole array at once (the scheduler throttles it with
        `parallel`); on this node (cluster 'local') `parallel` runs at a time, default 1, since
        every run may take all the GPUs."""
        if self.cluster == "slurm":
            jobs = self.submit(cfgs, out)
            log(f"submitted {len(jobs)} runs as job array "
                f"{jobs[0].job_id.split('_')[0] if jobs else '-'}; logs in {self.folder}")
            return self.wait(jobs, log)
        todo, results, wave = self.pending(cfgs, out), [], max(1, self.options.parallel)
        for i in range(0, len(todo), wave):
            results += self.wait(self.submit(todo[i:i + wave], out), log)
        return results

    @staticmethod
    def wait(jobs: list, log: Callable[[str], None] = print) -> list[dict]:
        """Each job's summary (rank 0's for a data-parallel run); a job that died without one
        gives status `failed`."""
        results = []
        for job in jobs:
            try:
                results.append(job.results()[0])
            except Exception as e:  # noqa: BLE001 - a lost job must not hide the others
                log(f"job {job.job_id} failed: {' '.join(str(e).split())[:300]}")
                results.append({"job_id": job.job_id, "status": "failed", "error": str(e)})
        return results


# -- `bnlab study run --executor slurm|node` ---------------------------------------------------
EXECUTORS = {"local": "this machine's processes (bnlab.study; default)",
             "slurm": "a SLURM job array through submitit",
             "node": "this machine through submitit, one (data-parallel) run at a time"}


def add_flags(p) -> None:
    """The executor options of `bnlab study run` (argparse parser or group)."""
    g = p.add_argument_group("cluster execution (--executor slurm or node)")
    g.add_argument("--executor", choices=tuple(EXECUTORS), default="local",
                   help="; ".join(f"{k}: {v}" for k, v in EXECUTORS.items()))
    d = SlurmOptions()
    g.add_argument("--partition", default=d.partition, help="SLURM partition")
    g.add_argument("--account", default=d.account, help="SLURM account")
    g.add_argument("--gpus-per-run", type=int, default=d.gpus_per_run, metavar="N",
                   help="GPUs of one run (N > 1: data-parallel, one task per GPU on one node)")
    g.add_argument("--cpus-per-gpu", type=int, default=d.cpus_per_gpu, metavar="N",
                   help="CPU cores per GPU (DataLoader workers)")
    g.add_argument("--time", type=int, default=d.time, metavar="MINUTES",
                   help="time limit of one job; a run cut off is requeued and resumes")
    g.add_argument("--mem", type=int, default=d.mem_gb, metavar="GB",
                   help="memory per node (0 = the partition's default)")
    g.add_argument("--parallel", type=int, default=d.parallel, metavar="N",
                   help="runs at a time (0: no limit on SLURM, 1 with --executor node)")


def options_from(args) -> SlurmOptions:
    return SlurmOptions(partition=args.partition, gpus_per_run=args.gpus_per_run,
                        cpus_per_gpu=args.cpus_per_gpu, time=args.time, mem_gb=args.mem,
                        parallel=args.parallel, account=args.account).validate()


def run_study(plan, out: str | Path, executor: str, options: SlurmOptions,
              log: Callable[[str], None] = print) -> dict[str, int]:
    """Run a study's plan (bnlab/spec.py) with the SLURM or node executor; {status: count}."""
    from bnlab.study import open_study_store

    store = open_study_store(plan, out)
    ex = SlurmExecutor(store.root / "slurm", options,
                       cluster="slurm" if executor == "slurm" else "local")
    cfgs = [r.cfg for r in plan.runs]
    todo = ex.pending(cfgs, store.root)
    log(f"study {plan.spec.name}: {len(cfgs)} runs, {len(cfgs) - len(todo)} already finished, "
        f"{len(todo)} to run with --executor {executor} -> {store.root}")
    ex.run(todo, store.root, log)
    counts: dict[str, int] = {}
    for c in cfgs:
        s = (store.run(c.run_id()).summary or {}).get("status", "missing")
        counts[s] = counts.get(s, 0) + 1
    return counts
