"""CIFAR-10 and CIFAR-100 in torchvision's official format (the python pickles)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision

from bnlab.data.bundle import DataBundle, Split, channel_stats
from bnlab.errors import UserError

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels",
                 b"fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"missing CIFAR file {str(path)!r}; expected torchvision's official "
                        "layout (use --download where a network exists)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise UserError(f"cannot read CIFAR file {str(path)!r}: {type(e).__name__}") from None


def _read(paths: list[Path], label_key: bytes) -> Split:
    xs, ys = [], []
    for p in paths:
        d = _unpickle(p)
        if b"data" not in d or label_key not in d:
            raise UserError(f"CIFAR file {str(p)!r} lacks b'data' or {label_key!r}")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(f"CIFAR file {str(p)!r} has data of shape {data.shape}, "
                            "expected (N, 3072)")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))


def load_cifar(name: str, data_dir: Path, download: bool) -> DataBundle:
    folder, train_files, test_files, meta_file, label_key, names_key = LAYOUT[name]
    root = Path(data_dir)
    if not (root / folder).is_dir() and download:
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(str(root), train=True, download=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"download of {name} into {str(root)!r} failed: {e}") from None
    base = root / folder
    if not base.is_dir():
        raise UserError(f"no {folder!r} folder in data dir {str(root)!r}; expected "
                        f"torchvision's official {name} layout (or pass --download)")
    train = _read([base / f for f in train_files], label_key)
    test = _read([base / f for f in test_files], label_key)
    classes = [c.decode() for c in _unpickle(base / meta_file)[names_key]]
    mean, std = channel_stats(train.x)
    return DataBundle(name, classes, 3, 32, mean, std, train, test, flip=True)
