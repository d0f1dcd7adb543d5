"""CIFAR-10 and CIFAR-100 in torchvision's official format (the python pickles).

A pickle can run any code while it is read, so these files are read by `SafeUnpickler`, which
builds only what the official files hold: dicts, lists, tuples, bytes, str, numbers and numpy
arrays (their reconstruction functions and nothing else). A file that names anything more is
refused before any of it runs. A file whose `batch_label` says it is one of the official batches
must also have the official MD5 checksum (torchvision's list), so a damaged or altered copy of
the real data is refused too; files of one's own (other labels) are read with the same
restricted unpickler.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from bnlab.data.bundle import DataBundle, Split, channel_stats
from bnlab.errors import UserError

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels",
                 b"fine_label_names"),
}
CLASSES = {"cifar10": 10, "cifar100": 100}

# torchvision.datasets.CIFAR10/CIFAR100: file -> (the batch_label it holds, MD5 of the file)
OFFICIAL = {
    "cifar10": {
        "data_batch_1": (b"training batch 1 of 5", "c99cafc152244af753f735de768cd75f"),
        "data_batch_2": (b"training batch 2 of 5", "d4bba439e000b95fd0a9bffe97cbabec"),
        "data_batch_3": (b"training batch 3 of 5", "54ebc095f3ab1f0389bbae665268c751"),
        "data_batch_4": (b"training batch 4 of 5", "634d18415352ddfa80567beed471001a"),
        "data_batch_5": (b"training batch 5 of 5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        "test_batch": (b"testing batch 1 of 1", "40351d587109b95175f43aff81a1287e"),
    },
    "cifar100": {
        "train": (b"training batch 1 of 1", "16019d7e3df5f24257cddd939b257f8d"),
        "test": (b"testing batch 1 of 1", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
    },
}


def _numpy(module: str, name: str):
    """numpy's own function `name` of `module`: numpy 2 moved numpy.core to numpy._core, and
    pickles name either."""
    for m in (module.replace("numpy.core", "numpy._core"), module):  # numpy 2, then 1
        try:
            return getattr(importlib.import_module(m), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{module}.{name}")


def _latin1(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Python 3 pickles (protocol 2) store bytes as `_codecs.encode(text, 'latin1')`."""
    if encoding not in ("latin1", "latin-1") or errors != "strict":
        raise Forbidden(f"it asks for _codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


def _allowed() -> dict[tuple[str, str], object]:
    out: dict[tuple[str, str], object] = {("_codecs", "encode"): _latin1,
                                          ("numpy", "ndarray"): np.ndarray,
                                          ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        out[(f"{core}.multiarray", "_reconstruct")] = _numpy("numpy.core.multiarray",
                                                             "_reconstruct")
        out[(f"{core}.multiarray", "scalar")] = _numpy("numpy.core.multiarray", "scalar")
        out[(f"{core}.numeric", "_frombuffer")] = _numpy("numpy.core.numeric", "_frombuffer")
    return out


class Forbidden(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR file never holds."""


class SafeUnpickler(pickle.Unpickler):
    """Builds builtin containers, bytes, str, numbers and numpy arrays; refuses every other
    global (a class or function the pickle names), so no code of the file's choosing runs."""

    ALLOWED = _allowed()

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise Forbidden(f"it asks for {module}.{name}") from None


def safe_load(raw: bytes, path: Path) -> object:
    """Unpickle `raw` (the bytes of `path`) with SafeUnpickler, or raise a UserError."""
    try:
        return SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Forbidden as e:
        raise UserError(f"refused CIFAR file {str(path)!r}: {e}, which a CIFAR pickle never "
                        "holds (only dicts, lists, bytes, numbers and numpy arrays are read)"
                        ) from None
    except Exception as e:  # noqa: BLE001 - truncated or garbled bytes: a damaged file
        raise UserError(f"cannot read CIFAR file {str(path)!r}: {type(e).__name__}") from None


def _read_file(path: Path) -> tuple[bytes, str]:
    if not path.is_file():
        raise UserError(f"missing CIFAR file {str(path)!r}; expected torchvision's official "
                        "layout (use --download where a network exists)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read CIFAR file {str(path)!r}: {e.strerror}") from None
    return raw, hashlib.md5(raw).hexdigest()


def _unpickle(path: Path, official: dict | None = None) -> tuple[dict, str]:
    """A CIFAR file's dict and the MD5 of its bytes; an official batch is checked against its
    MD5 (`official`: file name -> (batch label, MD5))."""
    raw, md5 = _read_file(path)
    d = safe_load(raw, path)
    if not isinstance(d, dict):
        raise UserError(f"CIFAR file {str(path)!r} holds a {type(d).__name__}, not a dict")
    claim = (official or {}).get(path.name)
    if claim and d.get(b"batch_label") == claim[0] and md5 != claim[1]:
        raise UserError(f"CIFAR file {str(path)!r} says it is the official "
                        f"{claim[0].decode()!r} but its MD5 is {md5}, not {claim[1]}: the copy "
                        "is damaged or altered (download it again)")
    return d, md5


def _read(paths: list[Path], label_key: bytes, classes: int, official: dict,
          digests: list[str]) -> Split:
    xs, ys = [], []
    for p in paths:
        d, md5 = _unpickle(p, official)
        digests.append(f"{p.name}:{md5}")
        if b"data" not in d or label_key not in d:
            raise UserError(f"CIFAR file {str(p)!r} lacks b'data' or {label_key!r}")
        data = d[b"data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                or data.shape[1] != 3072:
            shown = getattr(data, "shape", type(data).__name__)
            raise UserError(f"CIFAR file {str(p)!r} has data {shown}, expected uint8 "
                            "(N, 3072)")
        try:
            labels = np.asarray(d[label_key], dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"CIFAR file {str(p)!r} has labels that are not integers") from None
        if labels.shape != (len(data),):
            raise UserError(f"CIFAR file {str(p)!r} has {labels.size} labels for {len(data)} "
                            "images")
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise UserError(f"CIFAR file {str(p)!r} has labels outside 0..{classes - 1}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))


def load_cifar(name: str, data_dir: Path, download: bool) -> DataBundle:
    folder, train_files, test_files, meta_file, label_key, names_key = LAYOUT[name]
    root = Path(data_dir)
    if not (root / folder).is_dir() and download:
        import torchvision  # only to download: importing it takes a second or more

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(str(root), train=True, download=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"download of {name} into {str(root)!r} failed: {e}") from None
    base = root / folder
    if not base.is_dir():
        raise UserError(f"no {folder!r} folder in data dir {str(root)!r}; expected "
                        f"torchvision's official {name} layout (or pass --download)")
    digests: list[str] = []
    k = CLASSES[name]
    train = _read([base / f for f in train_files], label_key, k, OFFICIAL[name], digests)
    test = _read([base / f for f in test_files], label_key, k, OFFICIAL[name], digests)
    meta, _ = _unpickle(base / meta_file)
    names = meta.get(names_key)
    if not isinstance(names, list) or len(names) != k or \
            not all(isinstance(c, bytes | str) for c in names):
        raise UserError(f"CIFAR file {str(base / meta_file)!r} lacks a list of {k} class "
                        f"names under {names_key!r}")
    classes = [c.decode(errors="replace") if isinstance(c, bytes) else c for c in names]
    mean, std = channel_stats(train.x)
    fingerprint = hashlib.sha256(" ".join(digests).encode()).hexdigest()[:16]
    return DataBundle(name, classes, 3, 32, mean, std, train, test, flip=True,
                      fingerprint=f"{name}:{fingerprint}")
