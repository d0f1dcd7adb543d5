"""The decode-once cache: keys, and atomic writes into it (its folder: bnlab.config.cache_root).

Everything here can be rebuilt, so an entry that cannot be read (damaged, truncated, of another
format) is ignored and made again, never trusted: arrays are read with allow_pickle=False and
JSON as plain data. A write that fails (disk full, no permission) is a one-line StorageError
naming the path; the temporary file is removed, so a reader never sees half an entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from bnlab.store import atomic_write


def key_of(*parts) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()[:16]


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz atomically: a reader sees the old file, or the whole new one."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - OSError, ValueError, BadZipFile, ...: a damaged
        return None  # cache entry is rebuilt, never trusted


def save_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj).encode()))


def load_json(path: Path):
    """The JSON document at `path`, or None when it is missing or not valid JSON."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
