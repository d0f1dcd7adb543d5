"""MNIST and Fashion-MNIST from the original IDX files, raw or gzipped."""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from bnlab.data.bundle import DataBundle, Split, channel_stats
from bnlab.errors import UserError

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SUBDIRS = {"mnist": ["", "mnist", "MNIST/raw"],
           "fashion-mnist": ["", "fashion-mnist", "FashionMNIST/raw"]}
CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
}


def read_idx(path: Path, digest=None) -> np.ndarray:
    """Parse one IDX file (magic: two zero bytes, type 0x08 = ubyte, number of dimensions);
    `digest` (a hashlib object) is updated with its bytes (unzipped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read IDX file {str(path)!r}: {e}") from None
    if digest is not None:
        digest.update(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{str(path)!r} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise UserError(f"IDX file {str(path)!r} is truncated")
    shape = struct.unpack(">" + "I" * ndim, raw[4:head])
    n = math.prod(shape)  # exact: a forged header must not overflow into a plausible size
    if len(raw) - head != n:
        raise UserError(f"IDX file {str(path)!r} holds {len(raw) - head} bytes of data, its "
                        f"header says {n}")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def _find(root: Path, name: str, stem: str) -> Path:
    for sub in SUBDIRS[name]:
        for suffix in ("", ".gz"):
            p = root / sub / (stem + suffix)
            if p.is_file():
                return p
    raise UserError(f"no {stem}[.gz] for {name} in data dir {str(root)!r} (looked in "
                    f"{', '.join(repr(s or '.') for s in SUBDIRS[name])}; or pass --download)")


def load_mnist(name: str, data_dir: Path, download: bool) -> DataBundle:
    root = Path(data_dir)
    if download:
        import torchvision  # only to download: importing it takes a second or more

        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        try:
            _find(root, name, FILES["train"][0])
        except UserError:
            try:
                cls(str(root), train=True, download=True)
                cls(str(root), train=False, download=True)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"download of {name} into {str(root)!r} failed: {e}") from None
    splits = {}
    digest = hashlib.sha256()
    for split, (img_stem, lbl_stem) in FILES.items():
        images = read_idx(_find(root, name, img_stem), digest)
        labels = read_idx(_find(root, name, lbl_stem), digest)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) \
                or 0 in images.shape:
            raise UserError(f"{name} {split} files disagree: images {images.shape}, "
                            f"labels {labels.shape}")
        if labels.max() >= len(CLASSES[name]):
            raise UserError(f"{name} {split} labels ({str(_find(root, name, lbl_stem))!r}) go "
                            f"up to {labels.max()}; accepted: 0..{len(CLASSES[name]) - 1}")
        splits[split] = Split(torch.from_numpy(images.copy()).unsqueeze(1),
                              torch.from_numpy(labels.astype(np.int64)))
    mean, std = channel_stats(splits["train"].x)
    size = splits["train"].x.shape[-1]
    return DataBundle(name, CLASSES[name], 1, size, mean, std, splits["train"], splits["test"],
                      flip=(name == "fashion-mnist"),
                      fingerprint=f"{name}:{digest.hexdigest()[:16]}")
