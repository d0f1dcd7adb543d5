"""Run folders and the SQLite index of an output root: the only code that writes results.

Layout of an output root:

    OUT/index.sqlite            one row per run (WAL mode, safe for several processes)
    OUT/<run_id>/config.json    {"config": resolved RunConfig, "env": versions, device, git commit}
    OUT/<run_id>/metrics.jsonl  one JSON object per finished epoch
    OUT/<run_id>/summary.json   status, final test accuracy/loss, epochs done, wall time
    OUT/<run_id>/checkpoint.pt  model, optimizer, step, RNG states (saved each epoch)
    OUT/<run_id>/<name>.jsonl   further row files (probes, ...)
    OUT/study.json              the study a runner expanded into these runs (`write_meta`)
    OUT/report/                 report.html, report.md and figures (bnlab/report, `write_bytes`)
    OUT/.locks/<run_id>.lock    flock()ed by the process training the run; the kernel drops the
                                lock when that process dies, even by SIGKILL
    OUT/index.sqlite.damaged    an index SQLite could not read, kept after it was rebuilt

files.py has the run folders (atomic writes, reading, checkpoints), index.py the index,
locks.py the per-run lock files (`Store.lock`, `Store.is_locked`), rows.py the type of a
metrics.jsonl row (`EpochRow`), written by the training loops and read by reports.

Every file is written to a temporary name and renamed over the old one, so a reader (or a run
killed at any moment) sees either the previous complete file or the new complete file. A write
the file system refuses (disk full, read-only, no permission) is a one-line StorageError naming
the path, and leaves the previous file as it was.

The run folders are the truth; index.sqlite is derived from them. An index that SQLite cannot
read (random bytes, a torn page) is moved aside to index.sqlite.damaged and rebuilt from the run
folders, with one warning line; one that lost rows (truncated, its WAL file deleted) is
completed from the folders when the runs are listed (`reconcile`); `rebuild_index` does it all
on request (`bnlab runs --rebuild-index`). Run ids read from an index or a study file are
plain folder names inside the root, never a path that leads out of it.
"""

from bnlab.store.files import (
    CHECKPOINT_KEYS,
    FINISHED,
    STATUSES,
    RunDir,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    final_status,
    is_run_id,
    load_checkpoint_file,
    load_tensors,
    read_json_file,
    warn,
)
from bnlab.store.index import Store, open_store, row_of
from bnlab.store.rows import EpochRow

__all__ = ["CHECKPOINT_KEYS", "FINISHED", "EpochRow", "STATUSES", "RunDir", "Store", "atomic_write",
           "atomic_write_bytes", "atomic_write_json", "final_status", "is_run_id",
           "load_checkpoint_file", "load_tensors", "open_store", "read_json_file", "row_of", "warn"]
