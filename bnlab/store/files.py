"""Run folders: atomic writes, reading what a run stored, checkpoints (see bnlab.store)."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import pickletools
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from bnlab.config import FIELDS
from bnlab.errors import StorageError, UserError, storage_error
from bnlab.store.rows import EpochRow

STATUSES = ("running", "completed", "diverged", "no_learning", "failed")
FINISHED = ("completed", "diverged", "no_learning")  # outcomes that are results, never redone
CHECKPOINT_KEYS = ("model", "config", "optimizer", "epoch", "step", "wall_time", "rng_cpu")
_warned: set[str] = set()


def warn(text: str) -> None:
    """One warning line on stderr (each text once per process)."""
    if text not in _warned:
        _warned.add(text)
        sys.stderr.write(f"bnlab: warning: {text}\n")


def final_status(flags: dict, at_chance: bool) -> str:
    """The status of a run that trained to its end or stopped at a non-finite loss: diverged
    (a `diverged_step` flag, or `test_loss_nonfinite_epoch`: its test loss was non-finite),
    no_learning (its last test accuracy at chance: `at_chance`), else completed. It describes
    how the run ended; an early stall that the run recovered from is kept as the flag
    `at_chance_until_epoch`, not as a status."""
    if "diverged_step" in flags or "test_loss_nonfinite_epoch" in flags:
        return "diverged"
    return "no_learning" if at_chance else "completed"


def is_run_id(name: str) -> bool:
    """A run id is one plain folder name: no separator, not hidden, '.' or '..', printable."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".")
            and "/" not in name and "\\" not in name and name.isprintable())


def _unlink(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only
    read it by setting it, which another thread could see in between)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`, so a
    reader sees the old file or the whole new one; a StorageError (path and cause) when the
    file system refuses, with the old file left as it was. The file gets the mode a plain
    open() would give it (0666 less the umask), not mkstemp's 0600, so a study in a shared
    folder can be read by those the umask lets read it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _folder_error(path.parent, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise storage_error(path, e) from None
    except BaseException:
        _unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` by `data` in one rename (atomic_write)."""
    atomic_write(path, lambda f: f.write(data))


def _folder_error(folder: Path, e: OSError) -> StorageError:
    if isinstance(e, FileExistsError | NotADirectoryError) or e.errno == errno.ENOTDIR:
        return StorageError(f"{str(folder)!r} (or a folder above it) is a file, not a folder: "
                            "give a folder (--out DIR, or BNLAB_CACHE for the cache)")
    return storage_error(folder, e, "write into")


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


def read_json_file(path: Path) -> Any | None:
    """The JSON document at `path`; None when there is no such file; a UserError naming the
    file when it cannot be read or is not JSON."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise UserError(f"{str(path)!r} is a folder, not a JSON file") from None
    except OSError as e:
        raise storage_error(path, e, "read") from None
    try:
        return json.loads(text)
    except ValueError:
        raise UserError(f"{str(path)!r} is not valid JSON (damaged or cut short)") from None


def _kind_of(default) -> tuple[tuple[type, ...], str]:
    """The JSON types a stored config value of a field with this default may have, in words."""
    if isinstance(default, bool):
        return (bool,), "true or false"
    if isinstance(default, int):
        return (int,), "an integer"
    if isinstance(default, float):
        return (int, float), "a number"
    return (str,), "text"


def config_problem(config: dict) -> str | None:
    """What is wrong with the types of a stored run config (config.json's `config` table), or
    None: each option bnlab knows must hold its own type (an `epochs` of "x" is damage, not
    a run to list). Options this version does not know are left to the code that reads them."""
    for key, value in config.items():
        field = FIELDS.get(key)
        if field is None:
            continue
        if field.default_factory is not dataclasses.MISSING:
            types, words = (dict,), "a table"
        else:
            types, words = _kind_of(field.default)
        wrong = isinstance(value, bool) and bool not in types
        if wrong or not isinstance(value, types) or (
                isinstance(value, float) and not math.isfinite(value)):
            return f"{key} = {json.dumps(value)}, where {words} belongs"
    return None


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
        return read_json_file(self.path / name)

    def write_rows(self, name: str, rows: Iterable[dict]) -> None:
        text = "".join(json.dumps(_clean(r), sort_keys=True) + "\n" for r in rows)
        atomic_write_bytes(self.path / name, text.encode())

    def read_rows(self, name: str) -> list[dict]:
        """The rows of a .jsonl file; a line that is not a JSON object (a line torn by a crash
        or a full disk in a copy) is left out with a warning."""
        p = self.path / name
        try:
            text = p.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise storage_error(p, e, "read") from None
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                warn(f"{str(p)!r} line {i} is not a JSON object (torn by a crash?); ignored")
        return rows

    def stored(self) -> dict | None:
        """config.json as a whole ({"config": ..., "env": ...}); None when there is none; a
        UserError naming the file when it is damaged: not JSON, no `config` table, or an
        option of the wrong type in it (`config_problem`)."""
        c = self.read_json("config.json")
        if c is None:
            return None
        where = str(self.path / "config.json")
        if not (isinstance(c, dict) and isinstance(c.get("config"), dict)):
            raise UserError(f"{where!r} holds no run config")
        problem = config_problem(c["config"])
        if problem:
            raise UserError(f"{where!r} is damaged: it holds {problem}")
        return c

    @property
    def config(self) -> dict | None:
        c = self.stored()
        return None if c is None else c["config"]

    @property
    def summary(self) -> dict | None:
        """summary.json; None when there is none, {} (a run interrupted) when it is damaged."""
        try:
            s = self.read_json("summary.json")
        except StorageError:
            raise
        except UserError:
            s = "damaged"
        if s is not None and not isinstance(s, dict):
            warn(f"{str(self.path / 'summary.json')!r} is damaged; the run counts as "
                 "interrupted (it resumes from its checkpoint, or starts again)")
            return {}
        return s

    def metrics(self) -> list[dict]:
        return [r for r in self.read_rows("metrics.jsonl")
                if isinstance(r.get("epoch"), int) and not isinstance(r.get("epoch"), bool)]

    def epoch_rows(self) -> list[EpochRow]:
        """metrics.jsonl as typed rows (bnlab.store.rows; older files included)."""
        return [EpochRow.from_dict(r) for r in self.metrics()]

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def save_checkpoint(self, state: dict) -> None:
        """Serialize in memory, then write like every other file (temporary name, fsync,
        rename): a full disk is then an OSError at a known path, never a half-written zip."""
        import torch  # lazy: reading a store's records (study list, status) needs no torch

        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.checkpoint_path, buf.getbuffer())

    def load_checkpoint(self, map_location="cpu") -> dict | None:
        if not self.checkpoint_path.is_file():
            return None
        return load_checkpoint_file(self.checkpoint_path, map_location)


def _names_objects(path: Path) -> bool:
    """Whether the file is a whole pickle (the legacy format of torch.save) that names a class
    or function: what torch refuses to load as weights because loading it could run code."""
    if zipfile.is_zipfile(path):
        return False  # torch names the global itself for its zip format
    try:
        with open(path, "rb") as f:
            names = False
            for op, _, _ in pickletools.genops(f):
                names = names or op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ")
            return names
    except Exception:  # noqa: BLE001 - not a whole pickle (random bytes, cut short)
        return False


def load_tensors(path: Path, what: str, map_location="cpu") -> Any:
    """torch.load(path, weights_only=True), or bnlab's own one line naming `what` and the file:
    a file that holds other objects than tensors (a pickled class or function, which could
    run code) is not loaded, and a file that is no torch file at all says so."""
    import torch  # lazy, as in save_checkpoint

    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol it may not read:
            warnings.simplefilter("ignore", UserWarning)  # the outcome is said below
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors of every kind, zip errors, ...
        if "global" in str(e).lower() or _names_objects(path):
            raise UserError(f"{what} {str(path)!r} holds objects other than tensors and is not "
                            "loaded (bnlab reads only tensors, numbers, strings and containers "
                            "of them, so that no file can run code)") from None
        raise UserError(f"{what} {str(path)!r} is not a file saved by torch.save (damaged, cut "
                        f"short, or of another format; torch says {type(e).__name__})") from None


def load_checkpoint_file(path: str | Path, map_location="cpu") -> dict:
    """Load a bnlab checkpoint with weights_only=True, or raise a UserError naming the file."""
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.pt"
    if not p.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    state = load_tensors(p, "checkpoint", map_location)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{str(p)!r} is not a bnlab checkpoint (no model/config entries)")
    return state
