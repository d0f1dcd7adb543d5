"""The unit of work of every executor: one run of a study, under its lock.

`run_one` skips a finished run, resumes an interrupted one from its checkpoint, or trains it
from scratch, and turns any failure of the run into a stored `failed` summary instead of an
exception. Because every file a run writes is replaced atomically and the lock dies with its
process, a runner killed at any moment (SIGKILL included) and started again ends with exactly
the results of an uninterrupted study, and two runners on the same folder share the runs instead
of training any twice.

Two faults are not a run's and stop the study instead (they raise, as one-line UserErrors): the
file system refusing a write (StorageError: the next run would meet the same full or read-only
disk), and a run folder holding a run trained on other data than the study now reads (the run id
names the dataset, not its files; see `check_data`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bnlab.config import RunConfig
from bnlab.data import fingerprint
from bnlab.errors import StorageError, UserError
from bnlab.store import FINISHED, Store
from bnlab.train import train_run
from bnlab.train.record import RunRecord, record_failure


def check_data(store: Store, cfg: RunConfig) -> None:
    """Refuse a stored run of `cfg` that was trained on other data than `cfg` reads now.

    Checked at resume and before a finished run is taken as done, rather than made part of the
    run id: ids then stay computable from the spec alone (status, reports and cluster
    submission need no data), and the same data read from another place keeps its results.
    The data is read once per process and dataset, only for runs whose folder holds a
    fingerprint."""
    rec = RunRecord(store, cfg)
    if rec.stored_fingerprint() is None:
        return
    why = rec.data_mismatch(fingerprint(cfg.dataset, cfg.data_dir or None, cfg.download))
    if why:
        raise UserError(why)


def run_one(cfg: RunConfig, out: str | Path, log: Callable[[str], None] = print,
            wait: bool = True, retry_failed: bool = True) -> dict:
    """Train, resume or skip one run under its lock; return its summary. Raises only the
    study-stopping UserErrors of the module docstring.

    With wait=False a run locked by another process is left to it: the result is then
    {"run_id": ..., "status": "busy"}. A stored `failed` run is trained again only when
    `retry_failed`.
    """
    store = Store(out)
    run = store.run(cfg.run_id())
    with store.lock(run.run_id, wait=wait) as held:
        if not held:
            return {"run_id": run.run_id, "status": "busy"}
        summary = run.summary
        status = (summary or {}).get("status")
        if status == "failed" and not retry_failed:
            return summary
        check_data(store, cfg)
        if status in FINISHED:
            return summary
        store.record_attempt(run.run_id, int((summary or {}).get("epochs_done") or 0))
        log(f"{run.run_id}: {'starting' if summary is None else 'resuming'}")
        try:
            return train_run(cfg, store.root, resume=True, log=log)
        except (KeyboardInterrupt, StorageError):
            raise
        except Exception as e:  # noqa: BLE001 - a run's failure must not stop the study
            return record_failure(store, cfg, e, log)


def run_one_crashed(store: Store, cfg: RunConfig, exitcode: int | None, log) -> dict:
    """Record a run whose worker process died, unless the run had finished anyway."""
    with store.lock(cfg.run_id(), wait=True):
        summary = store.run(cfg.run_id()).summary or {}
        if summary.get("status") in (*FINISHED, "failed"):
            return summary
        return record_failure(store, cfg, RuntimeError(
            f"worker process died with exit code {exitcode}"), log)
