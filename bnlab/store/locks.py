"""The per-run lock files of an output root: OUT/.locks/<run_id>.lock, flock()ed by the process
training the run. The kernel drops a lock when its process dies, even by SIGKILL, so a held lock
means a live process; the index (index.py) takes one of its own while it is rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from bnlab.errors import storage_error


@contextlib.contextmanager
def hold(root: Path, run_id: str, wait: bool = True, prefix: str = "") -> Iterator[bool]:
    """Hold ROOT/.locks/<prefix><run_id>.lock exclusively; yields False (at once) when `wait` is
    False and another process holds it."""
    path = root / ".locks" / f"{prefix}{run_id}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise storage_error(path, e, "create the lock") from None
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


def is_held(root: Path, run_id: str) -> bool:
    """Whether some process holds the run's lock right now (a lock file that does not exist, or
    cannot be opened on read-only storage, is held by no one)."""
    path = root / ".locks" / f"{run_id}.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
