"""Running a study: every run of a plan (bnlab/study/spec.py), resumable, isolated, locked.

`run_study` opens the study's folder (study.json), trains the packable GPU runs together as
packs (bnlab.train.packed), hands the rest to an executor (bnlab/study/executors.py: this
machine's processes, SLURM or this node through submitit) and counts the outcomes. Each run is
trained by the unit of work `bnlab.study.worker.run_one` under its lock.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from bnlab.errors import UserError
from bnlab.runtime import resolve_device
from bnlab.store import FINISHED, Store
from bnlab.study.executors import SlurmExecutor, run_parallel, run_serial
from bnlab.study.options import EXECUTORS, SlurmOptions
from bnlab.study.progress import Progress
from bnlab.study.spec import Plan
from bnlab.study.status import count_statuses
from bnlab.study.worker import check_data
from bnlab.train.packed import pack_groups, train_packed

PACK_DEVICES = {"cuda"}  # device types whose runs a study packs


def open_study_store(plan: Plan, out: str | Path) -> Store:
    """The study's output root with its study.json written; refuses a root of another study."""
    store = Store(out)
    old = store.read_meta("study.json")
    if old is not None and old.get("name") != plan.spec.name:
        raise UserError(f"{str(store.root)!r} holds the results of study {old.get('name')!r}, "
                        f"not {plan.spec.name!r}: pass another --out")
    store.write_meta("study.json", plan.study_json())
    return store


def run_study(plan: Plan, out: str | Path, jobs: int = 1, tty: bool | None = None,
              pack: bool = True, executor: str = "local",
              options: SlurmOptions | None = None, quiet: bool = False) -> dict[str, int]:
    """Run every run of `plan` into `out`; return {status: count} over the plan's runs, read
    from their folders afterwards (a run whose worker or job was lost counts as it was left:
    failed where that was recorded, else interrupted or pending; `unfinished(counts)`).

    Locally (executor 'local'), with `pack`, CUDA runs that differ only in what
    bnlab.train.packed can vary (seed, lr, ...) train together as packed networks first; the
    rest go to the executor one by one ('slurm' or 'node': submitit, with `options`).
    `quiet`: a progress bar and no log lines.
    """
    if executor not in EXECUTORS:
        raise UserError(f"executor {executor!r} is not accepted; accepted: "
                        f"{', '.join(EXECUTORS)}")
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    store = open_study_store(plan, out)
    progress = Progress(plan, store, tty=True if quiet else tty, quiet=quiet)
    finished = {r.run_id for r in plan.runs
                if (store.run(r.run_id).summary or {}).get("status") in FINISHED}
    for r in plan.runs:  # a finished run counts as done only if it was run on this data
        if r.run_id in finished:
            check_data(store, r.cfg)
    todo = [r for r in plan.runs if r.run_id not in finished]
    how = f"--jobs {jobs}" if executor == "local" else f"--executor {executor}"
    progress.log(f"study {plan.spec.name}: {len(plan.runs)} runs, {len(finished)} already "
                 f"finished, {len(todo)} to run, {how} -> {store.root}")
    if executor != "local":
        ex = SlurmExecutor(store.root / "slurm", options,
                           cluster="slurm" if executor == "slurm" else "local")
        ex.run([r.cfg for r in todo], store.root, progress.log)
        return count_statuses(store, plan)

    def execute(wait: bool, retry_failed: bool, runs) -> list:
        if jobs == 1:
            return run_serial(store, progress, wait, retry_failed, runs)
        return run_parallel(plan, store, progress, jobs, wait, retry_failed, runs)

    with progress:
        if pack:
            todo = _run_packed(store, progress, todo)
        busy = execute(False, True, todo)
        if busy:  # held by another runner: wait for it, and take over if it dies
            progress.log(f"{len(busy)} runs are being trained by another process; waiting")
            execute(True, False, busy)
    return count_statuses(store, plan)


def unfinished(counts: dict[str, int]) -> int:
    """How many runs of a study's counts did not end with a result (bnlab.store.FINISHED):
    failed, interrupted, pending, or still running elsewhere."""
    return sum(n for status, n in counts.items() if status not in FINISHED)


def _run_packed(store: Store, progress: Progress, todo: list) -> list:
    """Train the packable CUDA runs of `todo` in packs of up to 16; return the runs left.

    Packing pays on GPUs only (on the CPU a grouped network costs more per model-image, see
    docs/speed.md), so CPU runs are never packed. A pack takes every member's lock without
    waiting; if another runner holds one of them, the group is left to the usual path.
    """
    packable = [r for r in todo if resolve_device(r.cfg.device).type in PACK_DEVICES]
    done: set[str] = set()
    for group in pack_groups([r.cfg for r in packable], max_k=16):
        if len(group) < 2:
            continue
        with ExitStack() as stack:
            held = [stack.enter_context(store.lock(c.run_id(), wait=False)) for c in group]
            if not all(held):
                continue
            for c in group:
                s = store.run(c.run_id()).summary or {}
                store.record_attempt(c.run_id(), int(s.get("epochs_done") or 0))
            for summary in train_packed(group, store.root, resume=True, log=progress.log):
                progress.finished(summary)
        done |= {c.run_id() for c in group}
    return [r for r in todo if r.run_id not in done]
