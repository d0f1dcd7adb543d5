"""The SQLite index of an output root, derived from its run folders (see bnlab.store)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bnlab.errors import StorageError, UserError, storage_error
from bnlab.store import locks
from bnlab.store.files import (
    RunDir,
    _clean,
    _folder_error,
    atomic_write_bytes,
    atomic_write_json,
    is_run_id,
    read_json_file,
    warn,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    status TEXT NOT NULL,
    dataset TEXT, model TEXT, norm TEXT, init TEXT, seed INTEGER, lr REAL,
    batch_size INTEGER, epochs INTEGER, epochs_done INTEGER,
    test_acc REAL, test_loss REAL, wall_time REAL,
    config TEXT NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL,
    started REAL NOT NULL,
    host TEXT, pid INTEGER,
    from_epoch INTEGER
)
"""


def _damaged(e: sqlite3.DatabaseError) -> bool:
    """SQLite's errors for a file that is not (or no longer) a readable index: not a database,
    a torn page, or one without its tables (deleted or emptied while in use), as opposed to a
    busy, full or read-only one (other OperationalErrors)."""
    text = str(e).lower()
    return (not isinstance(e, sqlite3.OperationalError) or "malformed" in text
            or "not a database" in text or "no such table" in text)


def row_of(run: RunDir, root: Path) -> dict | None:
    """The index row of `run` from its config.json and summary.json (None: not a run)."""
    cfg, summary = run.config, run.summary or {}
    if cfg is None:
        return None
    return dict(
        run_id=run.run_id, path=str(run.path.relative_to(root)),
        status=str(summary.get("status", "running")), dataset=cfg.get("dataset"),
        model=cfg.get("model"), norm=cfg.get("norm"), init=cfg.get("init"),
        seed=_int(cfg.get("seed")), lr=_num(cfg.get("lr")), batch_size=_int(cfg.get("batch_size")),
        epochs=_int(cfg.get("epochs")), epochs_done=_int(summary.get("epochs_done")) or 0,
        test_acc=_num(summary.get("test_acc")), test_loss=_num(summary.get("test_loss")),
        wall_time=_num(summary.get("wall_time")), config=json.dumps(_clean(cfg), sort_keys=True),
        updated=time.time())


class Store:
    """An output root: run folders plus index.sqlite.

    readonly=True opens an existing root without writing anything (finished results on
    read-only storage, or another user's): the index is read as it is, completed from the run
    folders in memory where it lacks runs, and never healed on disk."""

    def __init__(self, root: str | Path, readonly: bool = False):
        self.root = Path(root)
        self.readonly = readonly
        self.index_path = self.root / "index.sqlite"
        if readonly:
            if not self.root.is_dir():
                raise UserError(f"{str(self.root)!r} is not a folder")
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _folder_error(self.root, e) from None
        self._open_index()

    # -- the index -----------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        """A connection in WAL mode. Switching a new index to WAL needs a lock that SQLite
        does not wait for (it answers "database is locked" at once while another process
        holds the file, e.g. two runners starting on one folder), so that step is retried
        for up to a minute; the mode then stays in the file and later opens only read it.
        A read-only store opens the file read-only, and as immutable where its folder cannot
        be written (SQLite then needs no -shm file beside it)."""
        if self.readonly:
            mode = "ro" if os.access(self.root, os.W_OK) else "ro&immutable=1"
            return sqlite3.connect(f"file:{quote(str(self.index_path))}?mode={mode}",
                                   uri=True, timeout=60)
        db = sqlite3.connect(self.index_path, timeout=60)
        db.execute("PRAGMA busy_timeout=60000")
        deadline = time.monotonic() + 60
        while True:
            try:
                if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    db.execute("PRAGMA journal_mode=WAL")  # a file system without WAL keeps
                return db  # its mode, as before
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    db.close()
                    raise
                time.sleep(0.02)

    def _query(self, fn: Callable[[sqlite3.Connection], Any], heal: bool = True) -> Any:
        """fn(connection) in one transaction, the connection closed after. A damaged index is
        rebuilt from the run folders (`heal`) and fn tried once more; a full disk, a read-only
        folder and the like are a StorageError naming the index."""
        for attempt in range(2 if heal and not self.readonly else 1):
            try:
                db = self._connect()
                try:
                    with db:
                        return fn(db)
                finally:
                    db.close()
            except sqlite3.DatabaseError as e:
                if attempt == 0 and heal and _damaged(e) and not self.readonly:
                    self._heal(str(e))
                    continue
                if _damaged(e):
                    raise UserError(f"the index {str(self.index_path)!r} is damaged ({e}); "
                                    "rebuild it: bnlab runs --out DIR --rebuild-index") from None
                raise StorageError(f"cannot use the index {str(self.index_path)!r}: {e}"
                                   ) from None
        raise AssertionError("unreachable")

    def _open_index(self) -> None:
        """Create the tables of a new index; an index that lost its tables while run folders
        exist (truncated to nothing, replaced) is damaged and rebuilt."""
        def create(db):
            had = db.execute("SELECT count(*) FROM sqlite_master WHERE name='runs'").fetchone()
            db.executescript(SCHEMA)
            return had[0]

        existed = self.index_path.exists()
        if not self._query(create) and self._folders():
            self._heal("it holds no table of runs" if existed else None, move_aside=False)

    def _folders(self) -> list[RunDir]:
        """Every run folder of the root (a plain name holding a config.json), sorted."""
        try:
            names = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        except OSError as e:
            raise storage_error(self.root, e, "list") from None
        return [RunDir(self.root / n) for n in names
                if is_run_id(n) and (self.root / n / "config.json").is_file()]

    def _folder_rows(self, runs: list[RunDir], damaged: set[str] | None = None) -> list[dict]:
        """The index rows of `runs`; a run whose config.json is damaged is left out with a
        warning (and its id added to `damaged`)."""
        rows = []
        for run in runs:
            try:
                row = row_of(run, self.root)
            except StorageError:
                raise
            except UserError as e:
                warn(f"{e}; left out of the index")
                if damaged is not None:
                    damaged.add(run.run_id)
                continue
            if row is not None:
                rows.append(row)
        return rows

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        with self.lock("index", wait=True, prefix=".index-"):
            yield

    def _heal(self, why: str | None, move_aside: bool = True) -> None:
        """Rebuild a damaged index from the run folders, once across processes (the first to
        take the lock rebuilds, the others find a good index). why=None: there was no index
        file at all (a copy of the run folders alone, or one deleted), which is not damage."""
        with self._index_lock():
            if move_aside and self._index_readable():
                return
            kept = self._move_aside() if move_aside else None
            n = self._fill(self._folder_rows(self._folders()))
        if why is None:
            warn(f"{str(self.root)!r} has no index yet; built from its {n} run folder(s)")
            return
        warn(f"the index {str(self.index_path)!r} was damaged ({why}); rebuilt from {n} run "
             f"folder(s)" + (f", the damaged file kept as {kept.name}" if kept else ""))

    def _index_readable(self) -> bool:
        try:
            db = self._connect()
            try:
                ok = db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
                return ok and bool(db.execute(
                    "SELECT count(*) FROM sqlite_master WHERE name='runs'").fetchone()[0])
            finally:
                db.close()
        except sqlite3.DatabaseError:
            return False

    def _move_aside(self) -> Path:
        kept = self.root / "index.sqlite.damaged"
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.index_path}{suffix}")
            if src.exists():
                try:
                    os.replace(src, f"{kept}{suffix}")
                except OSError as e:
                    raise storage_error(src, e, "move aside the damaged") from None
        return kept

    def _fill(self, rows: list[dict]) -> int:
        """Make the index hold exactly `rows` (its attempts are kept where it still has them)."""
        def fill(db):
            db.executescript(SCHEMA)
            db.execute("DELETE FROM runs")
            for row in rows:
                db.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES "
                           f"({', '.join('?' for _ in row)})", tuple(row.values()))
            return len(rows)
        return self._query(fill, heal=False)  # called while healing: no second heal

    def rebuild_index(self) -> int:
        """Rebuild the index from the run folders (`bnlab runs --rebuild-index`); the number of
        runs it then holds. An index SQLite cannot read is moved aside first."""
        if self.readonly:
            raise UserError(f"cannot rebuild the index of {str(self.root)!r}: opened read-only")
        with self._index_lock():
            if not self._index_readable() and self.index_path.exists():
                kept = self._move_aside()
                warn(f"the index {str(self.index_path)!r} was damaged; kept as {kept.name}")
            return self._fill(self._folder_rows(self._folders()))

    def run(self, run_id: str) -> RunDir:
        if not is_run_id(run_id):
            raise UserError(f"run id {run_id!r} is not a plain folder name inside "
                            f"{str(self.root)!r}")
        return RunDir(self.root / run_id)

    def record(self, run: RunDir) -> None:
        """Upsert the index row of `run` from its config.json and summary.json."""
        row = row_of(run, self.root)
        if row is None:
            return
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self._query(lambda db: db.execute(f"INSERT OR REPLACE INTO runs ({cols}) VALUES "
                                          f"({marks})", tuple(row.values())))

    def _index_rows(self) -> list[dict] | None:
        """The index's rows; None when a read-only store cannot read its index."""
        def read(db):
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY run_id")]
        if self.readonly and not self.index_path.is_file():
            return None
        try:
            return self._query(read)
        except UserError as e:
            if not self.readonly:
                raise
            warn(f"{e}; listing the run folders instead")
            return None

    def rows(self) -> list[dict]:
        """The index's rows, by run id (rows whose id is not a plain folder name are skipped)."""
        rows = self._index_rows()
        if rows is None:
            return self._folder_rows(self._folders())
        bad = [r["run_id"] for r in rows if not is_run_id(r["run_id"])]
        if bad:
            warn(f"the index {str(self.index_path)!r} names {len(bad)} run(s) outside "
                 f"{str(self.root)!r} (e.g. {bad[0]!r}); ignored (bnlab runs --rebuild-index)")
        return [r for r in rows if is_run_id(r["run_id"])]

    def reconcile(self) -> list[dict]:
        """The rows as the run folders say: the index's rows, with every run folder it lacks
        or holds out of date (status, epochs) taken from the folder. A writable index is
        brought up to date, with one warning line saying how many rows were missing or stale."""
        rows = {r["run_id"]: r for r in self.rows()}
        damaged: set[str] = set()
        folders = self._folder_rows(self._folders(), damaged)
        missing = [f for f in folders if f["run_id"] not in rows]
        stale = [f for f in folders if f["run_id"] in rows and any(
            rows[f["run_id"]][k] != f[k] for k in ("status", "epochs_done"))]
        if missing or stale:
            how = "" if self.readonly else "; updated from the run folders"
            warn(f"the index {str(self.index_path)!r} lacked {len(missing)} run folder(s) and "
                 f"was out of date for {len(stale)}{how}")
            if not self.readonly:
                for f in missing + stale:
                    self.record(RunDir(self.root / f["run_id"]))
        # a row whose folder was removed, or whose config.json is damaged: the folder is the
        # truth, and a damaged one is listed nowhere (as the report leaves it out)
        gone = [r for r in rows if r in damaged or not (self.root / r / "config.json").is_file()]
        for f in missing + stale:
            rows[f["run_id"]] = f
        for r in gone:
            del rows[r]
        return [rows[k] for k in sorted(rows)]

    def runs(self) -> list[RunDir]:
        return [self.run(r["run_id"]) for r in self.rows()]

    # -- study-level files ---------------------------------------------------------------------
    def write_meta(self, name: str, obj: Any) -> None:
        """Atomically write OUT/<name> (a JSON document about the whole output root)."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"meta file name {name!r} must be a plain file name")
        atomic_write_json(self.root / name, obj)

    def read_meta(self, name: str) -> Any | None:
        """OUT/<name> (may lie in a folder) as JSON; None when missing; a UserError naming the
        file when it is not JSON."""
        return read_json_file(self.root / name)

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Atomically write OUT/<name>, where name may lie in a folder (report/fig.png)."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"file name {name!r} must be a relative path inside the output root")
        atomic_write_bytes(self.root / rel, data)
        return self.root / rel

    # -- per-run locks and attempts ------------------------------------------------------------
    def lock(self, run_id: str, wait: bool = True,
             prefix: str = "") -> contextlib.AbstractContextManager[bool]:
        """Hold the run's lock file exclusively (bnlab.store.locks.hold)."""
        return locks.hold(self.root, run_id, wait, prefix)

    def is_locked(self, run_id: str) -> bool:
        """Whether some process holds the run's lock right now (bnlab.store.locks)."""
        return locks.is_held(self.root, run_id)

    def record_attempt(self, run_id: str, from_epoch: int) -> None:
        """Note that this process starts (or resumes, from `from_epoch`) training `run_id`."""
        self._query(lambda db: db.execute(
            "INSERT INTO attempts (run_id, started, host, pid, from_epoch) VALUES (?, ?, ?, ?, ?)",
            (run_id, time.time(), socket.gethostname(), os.getpid(), from_epoch)))

    def attempts(self) -> dict[str, list[dict]]:
        """run_id -> its attempts in order of start (none where a read-only store cannot read
        its index)."""
        def read(db):
            db.row_factory = sqlite3.Row
            out: dict[str, list[dict]] = {}
            for r in db.execute("SELECT * FROM attempts ORDER BY started, rowid"):
                out.setdefault(r["run_id"], []).append(dict(r))
            return out
        if self.readonly:
            try:
                return self._query(read) if self.index_path.is_file() else {}
            except UserError:
                return {}
        return self._query(read)


def _num(v):
    return v if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) \
        else None


def _int(v):
    return v if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63 else None


def open_store(root: str | Path, must_exist: bool = False,
               readonly: bool | None = False) -> Store:
    """The Store at `root`. must_exist: refuse a folder that holds no index and no run folder.
    readonly=None: read-only exactly when the folder or its index cannot be written (results
    on read-only storage, or another user's)."""
    p = Path(root)
    if must_exist and not (p / "index.sqlite").is_file() and not (
            p.is_dir() and any((c / "config.json").is_file() for c in p.iterdir()
                               if is_run_id(c.name))):
        raise UserError(f"{str(p)!r} is not a bnlab output folder (no index.sqlite and no run "
                        "folders)")
    if readonly is None:
        index = p / "index.sqlite"
        readonly = p.is_dir() and not (os.access(p, os.W_OK) and (
            not index.exists() or os.access(index, os.W_OK)))
    return Store(p, readonly=readonly)
