"""The decode-once cache: keys, and atomic writes into it (its folder: bnlab.config.cache_root).

Everything here can be rebuilt, so an entry that cannot be read (damaged, truncated, of another
format) is ignored and made again, never trusted: arrays are read with allow_pickle=False and
JSON as plain data. A write that fails (disk full, no permission) is a one-line StorageError
naming the path; the temporary file is removed, so a reader never sees half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from bnlab.errors import storage_error


def key_of(*parts) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()[:16]


def _atomic(path: Path, write) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it over `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise storage_error(path.parent, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise storage_error(path, e) from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically: a reader sees the old file, or the whole new one."""
    _atomic(path, lambda f: np.savez(f, **arrays))


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - OSError, ValueError, BadZipFile, ...: a damaged
        return None  # cache entry is rebuilt, never trusted


def save_json(path: Path, obj) -> None:
    _atomic(path, lambda f: f.write(json.dumps(obj).encode()))


def load_json(path: Path):
    """The JSON document at `path`, or None when it is missing or not valid JSON."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
