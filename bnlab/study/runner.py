"""Running a study: every run of a plan (bnlab/study/expand.py), resumable, isolated, locked.

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
from bnlab.study.expand import Plan
from bnlab.study.jobs import auto_jobs
from bnlab.study.options import EXECUTORS, SlurmOptions
from bnlab.study.progress import Progress
from bnlab.study.status import count_statuses
from bnlab.study.tuning import CHOOSABLE, choose, group_key
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


def run_study(plan: Plan, out: str | Path, jobs: int | str = 1, tty: bool | None = None,
              pack: bool = True, executor: str = "local",
              options: SlurmOptions | None = None, pack_cpu: bool = False,
              quiet: bool = False) -> dict[str, int]:
    """Run every run of `plan` into `out`; return {status: count} over the plan's runs, read
    from their folders afterwards (a run whose worker or job was lost counts as it was left:
    failed where that was recorded, else interrupted or pending; `unfinished(counts)`).

    Locally (executor 'local'), with `pack`, CUDA runs that differ only in what
    bnlab.train.packed can vary (seed, lr, ...) train together as packed networks first; the
    rest go to the executor one by one ('slurm' or 'node': submitit, with `options`).
    `pack_cpu` packs CPU runs too: slower than lone runs on a CPU, it is there to run the GPU
    path (every arm inside packs) at tiny sizes on a machine without a GPU.
    `quiet`: a progress bar and no log lines.
    """
    if executor not in EXECUTORS:
        raise UserError(f"executor {executor!r} is not accepted; accepted: "
                        f"{', '.join(EXECUTORS)}")
    if jobs != "auto" and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        raise UserError(f"--jobs must be an integer >= 1 or auto, got {jobs!r}")
    store = open_study_store(plan, out)
    if plan.groups:  # choices already made by an earlier runner
        plan = _with_choices(plan, store)
        store.write_meta("study.json", plan.study_json())
    progress = Progress(plan, store, tty=True if quiet else tty, quiet=quiet)
    finished = {r.run_id for r in plan.all_runs
                if (store.run(r.run_id).summary or {}).get("status") in FINISHED}
    for r in plan.all_runs:  # a finished run counts as done only if it was run on this data
        if r.run_id in finished:
            check_data(store, r.cfg)
    todo = [r for r in plan.all_runs if r.run_id not in finished]
    why, threads = "", None
    if jobs == "auto":
        jobs, threads, why = (auto_jobs(plan.all_runs, todo, plan.spec.estimate.get("sizes"))
                              if executor == "local" else (1, None, ""))
        why = f" (auto: {why})"
    how = f"--jobs {jobs}{why}" if executor == "local" else f"--executor {executor}"
    tuning = f" ({len(plan.tune_runs)} of them tuning runs)" if plan.tune_runs else ""
    progress.log(f"study {plan.spec.name}: {len(plan.all_runs)} runs{tuning}, "
                 f"{len(finished)} already finished, {len(todo)} to run, {how} -> {store.root}")

    def execute(runs, wait: bool = False, retry_failed: bool = True) -> list:
        if executor != "local":
            ex = SlurmExecutor(store.root / "slurm", options,
                               cluster="slurm" if executor == "slurm" else "local")
            ex.run([r.cfg for r in runs], store.root, progress.log)
            return []
        if jobs == 1 and threads is None:
            return run_serial(store, progress, wait, retry_failed, runs)
        return run_parallel(plan, store, progress, jobs, wait, retry_failed, runs, threads)

    def phase(runs) -> None:
        if pack and executor == "local":
            devices = PACK_DEVICES | ({"cpu"} if pack_cpu else set())
            runs = _run_packed(store, progress, runs, devices)
        busy = execute(runs)
        if busy:  # held by another runner: wait for it, and take over if it dies
            progress.log(f"{len(busy)} runs are being trained by another process; waiting")
            execute(busy, True, False)

    with progress:
        if plan.waiting:  # tuning first: the tuned runs' value comes from it
            tune_ids = {r.run_id for r in plan.tune_runs}
            phase([r for r in todo if r.run_id in tune_ids])
            plan = _with_choices(plan, store, log=progress.log)
            store.write_meta("study.json", plan.study_json())
            progress.plan = plan
            todo = [r for r in plan.runs if r.run_id not in finished
                    and (store.run(r.run_id).summary or {}).get("status") not in FINISHED]
        phase([r for r in todo if r.run_id in {p.run_id for p in plan.runs + plan.tune_runs}])
    return count_statuses(store, plan)


def unfinished(counts: dict[str, int]) -> int:
    """How many runs of a study's counts did not end with a result (bnlab.store.FINISHED):
    failed, interrupted, pending, or still running elsewhere."""
    return sum(n for status, n in counts.items() if status not in FINISHED)


def _with_choices(plan: Plan, store: Store, log=None) -> Plan:
    """`plan` with the values its groups' ended tuning runs choose (bnlab.study.tuning),
    each choice said in `log`; a group none of whose tuning runs finished training has no
    value, and its tuned runs are left out (said too)."""
    tune = plan.spec.tune
    chosen, dead = {}, set()
    for g in plan.groups:
        c = choose(store, g.key, [r.cfg for r in g.tuning], tune)
        if c.value is not None:
            chosen[g.key] = c.value
        elif c.ended:
            dead.add(g.key)
        if log is None or not c.ended:
            continue
        shown = ", ".join(f"{k}={v}" for k, v in g.label.items())
        trials = "; ".join(f"{t['value']}: " + (f"val acc {t['val_acc']:.4f}"
                           if t["status"] in CHOOSABLE and t["val_acc"] is not None
                           else t["status"]) for t in c.trials)
        if c.value is None:
            log(f"tuning {tune.axis} for ({shown}): no value chosen, no tuning run finished "
                f"training ({trials}); its runs are left out")
        else:
            edge = (f", the {c.edge} value tried (the values may need extending)"
                    if c.edge else "")
            log(f"tuning {tune.axis} for ({shown}) on seed {tune.seed}: {c.value} chosen"
                f"{edge} ({trials})")
    new = plan.with_choices(chosen)
    new.waiting = [r for r in new.waiting if group_key(r.cfg, tune) not in dead]
    return new


def _run_packed(store: Store, progress: Progress, todo: list,
                devices: set[str] = PACK_DEVICES) -> list:
    """Train the packable runs of `todo` on `devices` in packs of up to 16; return the runs
    left.

    Packing pays on GPUs only (on the CPU a grouped network costs more per model-image, see
    docs/speed.md), so CPU runs are packed only when asked (run_study's pack_cpu). A pack
    takes every member's lock without waiting; if another runner holds one of them, the group
    is left to the usual path.
    """
    packable = [r for r in todo if resolve_device(r.cfg.device).type in devices]
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
