"""Executors: who trains the runs of a study, each run through `worker.run_one`.

- local, serial: the runs in this process one after another (--jobs 1);
- local, parallel: each run in its own spawned process, at most N at a time (--jobs N), one GPU
  per process (round-robin) when several GPUs are visible;
- slurm: one job-array task per run through submitit; node: the same tasks as local processes
  of this machine, one (data-parallel) run at a time.

On SLURM each task calls the same unit of work, so a grid can be started on the cluster and
finished locally, or submitted again after a failure: finished runs are not submitted,
interrupted ones resume from their last epoch's checkpoint. A task that SLURM preempts or stops
at its time limit is requeued by submitit (the task is `Checkpointable`) and continues from
that checkpoint. With `gpus_per_run` > 1 a run is data-parallel: SLURM starts one task per GPU
on one node, submitit exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, and
every task calls `train_run` itself (bnlab/train/distributed.py reads that environment; rank 0
decides whether the run is new, resumed or finished and tells the others, and alone writes the
store). The array gives each run to exactly one job, so no lock is needed there.

Tests use submitit's local executor (`cluster="local"`): the same pickled tasks, run as local
processes instead of SLURM jobs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bnlab import machine
from bnlab.config import RunConfig, from_json_dict
from bnlab.errors import UserError
from bnlab.runtime import on_cpu
from bnlab.store import FINISHED, Store
from bnlab.study.estimate import estimate
from bnlab.study.expand import Plan
from bnlab.study.options import CLUSTERS, SlurmOptions
from bnlab.study.progress import Progress
from bnlab.study.worker import record_lost, run_one
from bnlab.train import train_run

RUN_ONE = "bnlab.study.worker:run_one"


# -- on this machine ---------------------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so killing a runner stops its
    workers too (and frees their run locks)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    Runs of a study share the CPU with each other (--jobs) and often with other work; spinning
    threads then steal the time slices of the threads they wait for. Measured on a 2-core
    machine under heavy load: 420 -> 3 ms per step of the MLP, 7.9 -> 1.0 s per ResNet-20 step
    of 128 images. On an idle machine spinning is faster (a ResNet-20 step 15-20%), so
    `bnlab study run` asks for this only with --jobs > 1 or a busy machine. OpenMP reads the
    variable when torch is loaded, so this reaches the workers spawned afterwards (and this
    process only if torch is not loaded yet).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _worker(tasks, msgs, out: str, wait: bool, retry_failed: bool, gpu: str | None,
            threads: int, parent: int) -> None:
    """One worker process of run_parallel: runs from `tasks` one after another until None.
    It stays up between runs, so torch is imported and a shared dataset decoded once per worker
    rather than once per run (seconds each on a small CPU)."""
    _die_with_parent(parent)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    torch.set_num_threads(threads)
    bundles: dict = {}
    while (cfg_dict := tasks.get()) is not None:
        cfg = from_json_dict(cfg_dict)
        try:
            summary = run_one(cfg, out, log=lambda line: msgs.put(("log", line)), wait=wait,
                              retry_failed=retry_failed, bundles=bundles)
        except UserError as e:  # a full disk, other data: the parent stops the study with it
            msgs.put(("error", cfg.run_id(), str(e)))
            return
        msgs.put(("done", cfg.run_id(), summary))


def _gpu_ids(plan: Plan) -> list[str]:
    """The GPUs to spread workers over (only when there are several)."""
    if all(r.cfg.device == "cpu" for r in plan.runs):
        return []
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n <= 1:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(n)]
    return ids[:n]


def longest_first(runs, sizes: dict | None = None) -> list:
    """`runs` by their estimated time, longest first (runs of the same estimate, or of none,
    keep their order). Workers that take the next run when one ends finish closest together
    this way: in `quick` the three probed runs (86-96 s against 62-69 s on a 2-core Xeon) came
    last in the spec's order, and one worker trained for about 30 s after the other stopped."""
    def minutes(r) -> float:
        cfg = dataclasses.replace(r.cfg, dataset=getattr(r, "dataset", r.cfg.dataset))
        est = estimate([cfg], "cpu" if on_cpu(cfg.device) else "gpu", sizes or {})
        return est.minutes or 0.0
    return sorted(runs, key=lambda r: -minutes(r))


def run_serial(store: Store, progress: Progress, wait: bool, retry_failed: bool,
                runs) -> list:
    busy, bundles = [], {}
    for r in runs:
        s = run_one(r.cfg, store.root, log=progress.log, wait=wait, retry_failed=retry_failed,
                    bundles=bundles)
        if s.get("status") == "busy":
            busy.append(r)
        else:
            progress.finished(s)
    return busy


def run_parallel(plan: Plan, store: Store, progress: Progress, jobs: int, wait: bool,
                 retry_failed: bool, runs, threads: int | None = None) -> list:
    """Train `runs` in `jobs` worker processes (spawned, each with cores // jobs threads and,
    when several GPUs exist, one GPU: worker i takes the i-th, round robin). A worker takes
    the next run, longest first, when it finishes one; one that dies (segfault, OOM kill) has
    its run recorded as lost and is replaced while runs remain. `threads`: torch threads per
    worker instead. Returns the runs another process held."""
    passive_openmp()
    ctx = mp.get_context("spawn")
    msgs = ctx.Queue()
    gpus = _gpu_ids(plan)
    threads = threads or max(1, machine.usable_cores() // jobs)
    todo = longest_first(runs, plan.spec.estimate.get("sizes"))
    done: dict[str, dict] = {}
    busy = []

    def drain(timeout: float) -> None:
        try:
            item = msgs.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if item[0] == "log":
                progress.log(item[1])
            elif item[0] == "error":
                raise UserError(item[2])
            else:
                done[item[1]] = item[2]
            try:
                item = msgs.get_nowait()
            except queue.Empty:
                return

    def start(i: int) -> dict:
        # not a daemon: a run may start DataLoader workers of its own
        tasks = ctx.Queue()
        p = ctx.Process(target=_worker, args=(tasks, msgs, str(store.root), wait, retry_failed,
                                              gpus[i % len(gpus)] if gpus else None, threads,
                                              os.getpid()))
        p.start()
        return {"proc": p, "tasks": tasks, "run": None}

    def settle(w: dict, s: dict) -> None:
        if s.get("status") == "busy":
            busy.append(w["run"])
        else:
            progress.finished(s)
        w["run"] = None

    workers: list[dict] = []
    try:
        workers = [start(i) for i in range(min(jobs, len(todo)))]
        while todo or any(w["run"] is not None for w in workers):
            for w in workers:
                if w["run"] is None and todo and w["proc"].exitcode is None:
                    w["run"] = todo.pop(0)
                    w["tasks"].put(w["run"].cfg.to_dict())
            drain(0.5)
            for i, w in enumerate(workers):
                if w["run"] is not None and w["run"].run_id in done:
                    settle(w, done.pop(w["run"].run_id))
                if w["proc"].exitcode is None or w.get("ended"):
                    continue
                drain(0.0)  # a worker that died: its last words first
                if w["run"] is not None:
                    r = w["run"]
                    s = done.pop(r.run_id, None) or record_lost(
                        store, r.cfg, f"worker process died with exit code "
                        f"{w['proc'].exitcode}", progress.log)
                    settle(w, s)
                w["proc"].join()
                if todo:
                    workers[i] = start(i)
                else:
                    w["ended"] = True
        for w in workers:
            if w["proc"].exitcode is None:
                w["tasks"].put(None)
        for w in workers:
            w["proc"].join()
    finally:
        for w in workers:
            if w["proc"].exitcode is None:
                w["proc"].kill()
                w["proc"].join()
    return busy


# -- through submitit (SLURM, or this node) ------------------------------------------------
def resolve(target: str) -> Callable:
    """'package.module:function' -> the function (importable by name, so tasks pickle small)."""
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UserError(f"cannot import {target!r} (expected package.module:function)") from None


def _submitit():
    try:
        import submitit  # optional: the cluster extra
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
            # one process per GPU: the run is data-parallel (bnlab/train/distributed.py)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            return train_run(cfg, out, resume=True)
        return resolve(self.run_one)(cfg, Path(out))

    def checkpoint(self, cfg_dict: dict, out: str):
        # the run's own per-epoch checkpoint is the state; the requeued task resumes from it
        return _submitit().helpers.DelayedSubmission(RunTask(self.run_one), cfg_dict, out)


def _in_job() -> bool:
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
        store = Store(out)
        return [c for c in cfgs
                if (store.run(c.run_id()).summary or {}).get("status") not in FINISHED]

    def submit(self, cfgs: Sequence[RunConfig], out: str | Path) -> list:
        """One array task per unfinished run; returns the submitit jobs (maybe none)."""
        return self._submit(self.pending(cfgs, out), out)

    def _submit(self, todo: Sequence[RunConfig], out: str | Path) -> list:
        """One array task per run of `todo`, in its order."""
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
            todo = self.pending(cfgs, out)
            jobs = self._submit(todo, out)
            log(f"submitted {len(jobs)} runs as job array "
                f"{jobs[0].job_id.split('_')[0] if jobs else '-'}; logs in {self.folder}")
            return self.wait(jobs, log, todo, out)
        todo, results, wave = self.pending(cfgs, out), [], max(1, self.options.parallel)
        for i in range(0, len(todo), wave):
            wave_cfgs = todo[i:i + wave]
            results += self.wait(self._submit(wave_cfgs, out), log, wave_cfgs, out)
        return results

    @staticmethod
    def wait(jobs: list, log: Callable[[str], None] = print,
             cfgs: Sequence[RunConfig] | None = None, out: str | Path | None = None
             ) -> list[dict]:
        """Each job's summary (rank 0's for a data-parallel run). A job that died without one
        gives status `failed`; given the jobs' runs (`cfgs`, in the order submitted) and their
        folder `out`, that is recorded in the run's folder too, unless the run finished or
        recorded its own failure, so the study's status counts it."""
        results = []
        for i, job in enumerate(jobs):
            try:
                results.append(job.results()[0])
            except Exception as e:  # noqa: BLE001 - a lost job must not hide the others
                why = f"job {job.job_id} died: {' '.join(str(e).split())[:300]}"
                log(why)
                if cfgs is not None and out is not None:
                    results.append(record_lost(Store(out), cfgs[i], why, log))
                else:
                    results.append({"job_id": job.job_id, "status": "failed", "error": str(e)})
        return results


# -- `bnlab study run --executor slurm|node` ---------------------------------------------------
