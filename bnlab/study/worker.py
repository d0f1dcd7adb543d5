"""The unit of work of every executor: one run of a study, under its lock.

`run_one` skips a finished run, resumes an interrupted one from its checkpoint, or trains it
from scratch, and turns any failure of the run into a stored `failed` summary instead of an
exception. Because every file a run writes is replaced atomically and the lock dies with its
process, a runner killed at any moment (SIGKILL included) and started again ends with exactly
the results of an uninterrupted study, and two runners on the same folder share the runs instead
of training any twice.

Two faults are not a run's and stop the study instead (they raise, as one-line UserErrors): the
file system refusing a write (StorageError: the next run would meet the same full or read-only
disk), and a run folder holding a run trained on other data than the study now reads
(DataMismatch: the run id names the dataset, not its files; see `check_data`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from bnlab.config import RunConfig
from bnlab.data import DataBundle, data_for
from bnlab.errors import DataMismatch, StorageError
from bnlab.store import FINISHED, Store
from bnlab.train import train_run
from bnlab.train.record import RunRecord, record_failure


def check_data(store: Store, cfg: RunConfig) -> None:
    """Refuse (DataMismatch) a stored run of `cfg` that was trained on other data than `cfg`
    reads now (RunRecord.check_data). The data is read once per process and dataset, only for
    runs whose folder holds a fingerprint."""
    RunRecord(store, cfg).check_data()


DATA_FIELDS = ("dataset", "data_dir", "download", "limit_train", "limit_test", "augment",
               "image_size", "val_fraction")  # what data_for makes a run's data from


def prepare_machine(cfgs: list[RunConfig]) -> None:
    """On a machine that has not built bnlab's fused CPU kernels yet (a fresh one), build them
    in a thread while this one decodes the first CPU run's dataset into the cache, so that the
    two first-time costs overlap (17.5 s and 15.6 s for CIFAR-10's 60,000 JPEGs on a 2-core
    Xeon) instead of following each other. Elsewhere it does nothing. A dataset that cannot be
    read is left to the run, which records why."""
    import threading

    from bnlab.fast import cpu_kernels
    from bnlab.runtime import on_cpu

    cpu = [c for c in cfgs if c.cpu_kernels and on_cpu(c.device)]
    if not cpu or os.environ.get("BNLAB_CPU_KERNELS", "1") == "0" \
            or (cpu_kernels.build_dir() / "ready").exists():
        return
    build = threading.Thread(target=cpu_kernels.prepare, daemon=True)
    build.start()
    try:
        data_for(cpu[0])
    except Exception:  # noqa: BLE001 - the run itself reports its data's problem
        pass
    build.join()


def shared_data(cfg: RunConfig, bundles: dict) -> DataBundle:
    """The run's data, loaded once for the runs of one process that share it: `bundles` holds
    the last one (the runs of a grid that share their data come one after another, and a
    decoded dataset is worth keeping for them: its cache alone takes seconds to read back)."""
    key = tuple(repr(getattr(cfg, f)) for f in DATA_FIELDS)
    if key not in bundles:
        bundles.clear()
        bundles[key] = data_for(cfg)
    return bundles[key]


def run_one(cfg: RunConfig, out: str | Path, log: Callable[[str], None] = print,
            wait: bool = True, retry_failed: bool = True, bundles: dict | None = None) -> dict:
    """Train, resume or skip one run under its lock; return its summary. Raises only the
    study-stopping UserErrors of the module docstring.

    With wait=False a run locked by another process is left to it: the result is then
    {"run_id": ..., "status": "busy"}. A stored `failed` run is trained again only when
    `retry_failed`. `bundles`: a dict shared by the runs of this process, to load data they
    share once (shared_data).
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
            bundle = shared_data(cfg, bundles) if bundles is not None else None
            return train_run(cfg, store.root, resume=True, log=log, bundle=bundle)
        except (KeyboardInterrupt, StorageError, DataMismatch):
            raise
        except Exception as e:  # noqa: BLE001 - a run's failure must not stop the study
            return record_failure(store, cfg, e, log)


def record_lost(store: Store, cfg: RunConfig, why: str, log) -> dict:
    """Record a run whose worker died without a word (a killed process, a lost cluster job:
    `why`), unless the run had finished anyway, or recorded its own failure."""
    with store.lock(cfg.run_id(), wait=True):
        summary = store.run(cfg.run_id()).summary or {}
        if summary.get("status") in (*FINISHED, "failed"):
            return summary
        return record_failure(store, cfg, RuntimeError(why), log)
