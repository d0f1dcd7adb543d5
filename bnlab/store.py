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

Every file is written to a temporary name and renamed over the old one, so a reader (or a run
killed at any moment) sees either the previous complete file or the new complete file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from bnlab.errors import UserError

STATUSES = ("running", "completed", "diverged", "no_learning", "failed")
FINISHED = ("completed", "diverged", "no_learning")  # outcomes that are results, never redone


def final_status(flags: dict, at_chance: bool) -> str:
    """The status of a run that trained to its end or stopped at a non-finite loss: diverged
    (a `diverged_step` flag), no_learning (its last test accuracy at chance: `at_chance`), else
    completed. It describes how the run ended; an early stall that the run recovered from is
    kept as the flag `at_chance_until_epoch`, not as a status."""
    if "diverged_step" in flags:
        return "diverged"
    return "no_learning" if at_chance else "completed"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(obj: Any) -> Any:
    """JSON cannot hold NaN/inf: store them as strings so the files stay standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, sort_keys=True) + "\n").encode())


class RunDir:
    """One run's folder."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.run_id = self.path.name

    def exists(self) -> bool:
        return (self.path / "config.json").is_file()

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.path / name, text.encode())

    def read_json(self, name: str) -> Any | None:
        p = self.path / name
        if not p.is_file():
            return None
        return json.loads(p.read_text())

    def write_rows(self, name: str, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(self.path / name, text.encode())

    def read_rows(self, name: str) -> list[dict]:
        p = self.path / name
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]

    @property
    def config(self) -> dict | None:
        c = self.read_json("config.json")
        return None if c is None else c["config"]

    @property
    def summary(self) -> dict | None:
        return self.read_json("summary.json")

    def metrics(self) -> list[dict]:
        return self.read_rows("metrics.jsonl")

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def save_checkpoint(self, state: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".checkpoint.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load_checkpoint(self, map_location="cpu") -> dict | None:
        if not self.checkpoint_path.is_file():
            return None
        return load_checkpoint_file(self.checkpoint_path, map_location)


def load_checkpoint_file(path: str | Path, map_location="cpu") -> dict:
    """Load a bnlab checkpoint with weights_only=True, or raise a UserError naming the file."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle of forbidden types, ...
        raise UserError(f"{str(p)!r} is not a readable bnlab checkpoint "
                        f"({type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{str(p)!r} is not a bnlab checkpoint (no model/config entries)")
    return state


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


class Store:
    """An output root: run folders plus index.sqlite."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index_path = self.root / "index.sqlite"
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        """A connection in WAL mode. Switching a new index to WAL needs a lock that SQLite
        does not wait for (it answers "database is locked" at once while another process
        holds the file, e.g. two runners starting on one folder), so that step is retried
        for up to a minute; the mode then stays in the file and later opens only read it."""
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

    def run(self, run_id: str) -> RunDir:
        return RunDir(self.root / run_id)

    def record(self, run: RunDir) -> None:
        """Upsert the index row of `run` from its config.json and summary.json."""
        cfg, summary = run.config, run.summary or {}
        if cfg is None:
            return
        row = dict(
            run_id=run.run_id, path=str(run.path.relative_to(self.root)),
            status=summary.get("status", "running"), dataset=cfg["dataset"],
            model=cfg["model"], norm=cfg["norm"], init=cfg["init"], seed=cfg["seed"],
            lr=cfg["lr"], batch_size=cfg["batch_size"], epochs=cfg["epochs"],
            epochs_done=summary.get("epochs_done", 0),
            test_acc=_num(summary.get("test_acc")), test_loss=_num(summary.get("test_loss")),
            wall_time=summary.get("wall_time"), config=json.dumps(cfg, sort_keys=True),
            updated=time.time())
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._connect() as db:
            db.execute(f"INSERT OR REPLACE INTO runs ({cols}) VALUES ({marks})",
                       tuple(row.values()))

    def rows(self) -> list[dict]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY run_id")]

    def runs(self) -> list[RunDir]:
        return [self.run(r["run_id"]) for r in self.rows()]

    # -- study-level files ---------------------------------------------------------------------
    def write_meta(self, name: str, obj: Any) -> None:
        """Atomically write OUT/<name> (a JSON document about the whole output root)."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"meta file name {name!r} must be a plain file name")
        atomic_write_json(self.root / name, obj)

    def read_meta(self, name: str) -> Any | None:
        p = self.root / name
        return json.loads(p.read_text()) if p.is_file() else None

    def write_bytes(self, name: str, data: bytes) -> Path:
        """Atomically write OUT/<name>, where name may lie in a folder (report/fig.png)."""
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"file name {name!r} must be a relative path inside the output root")
        atomic_write_bytes(self.root / rel, data)
        return self.root / rel

    # -- per-run locks and attempts ------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, run_id: str, wait: bool = True) -> Iterator[bool]:
        """Hold OUT/.locks/<run_id>.lock exclusively; yields False (at once) when `wait` is
        False and another process holds it."""
        path = self.root / ".locks" / f"{run_id}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def is_locked(self, run_id: str) -> bool:
        """Whether some process holds the run's lock right now."""
        with self.lock(run_id, wait=False) as held:
            return not held

    def record_attempt(self, run_id: str, from_epoch: int) -> None:
        """Note that this process starts (or resumes, from `from_epoch`) training `run_id`."""
        with self._connect() as db:
            db.execute("INSERT INTO attempts (run_id, started, host, pid, from_epoch) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (run_id, time.time(), socket.gethostname(), os.getpid(), from_epoch))

    def attempts(self) -> dict[str, list[dict]]:
        """run_id -> its attempts in order of start."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            out: dict[str, list[dict]] = {}
            for r in db.execute("SELECT * FROM attempts ORDER BY started, rowid"):
                out.setdefault(r["run_id"], []).append(dict(r))
            return out


def _num(v):
    return v if isinstance(v, int | float) and math.isfinite(v) else None


def open_store(root: str | Path, must_exist: bool = False) -> Store:
    p = Path(root)
    if must_exist and not (p / "index.sqlite").is_file():
        raise UserError(f"{str(p)!r} is not a bnlab output folder (no index.sqlite)")
    return Store(p)
