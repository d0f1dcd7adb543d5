"""Datasets by name: `load_data(name, data_dir, ...)` returns a DataBundle."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bnlab.data.bundle import DataBundle, Split, fixed_subset, hold_out, usable_std
from bnlab.data.cifar import load_cifar
from bnlab.data.imagefolder import folder_fingerprint, load_imagefolder
from bnlab.data.mnist import load_mnist
from bnlab.data.synthetic import make_synthetic
from bnlab.errors import UserError, unknown

DATASETS = {
    "cifar10": "CIFAR-10, torchvision's official pickles (cifar-10-batches-py/)",
    "cifar100": "CIFAR-100, torchvision's official pickles (cifar-100-python/)",
    "mnist": "MNIST, the original IDX files (raw or .gz)",
    "fashion-mnist": "Fashion-MNIST, IDX files (raw or .gz)",
    "imagefolder:PATH": "an ImageNet-style folder (train/ and val/ or test/ of class folders), "
                        "or a .tar/.tar.gz of one",
    "synthetic": "generated class templates plus noise (for tests; no files)",
}


def default_data_dir() -> Path:
    return Path(os.environ.get("BNLAB_DATA") or "data")


def load_data(name: str, data_dir: str | Path | None = None, download: bool = False,
              limit_train: int = 0, limit_test: int = 0, augment: bool = True,
              image_size: int = 0, val_fraction: float = 0.0) -> DataBundle:
    """Load a dataset, apply the fixed train/test subsets (`limit_*`, 0 = all), then hold out
    `val_fraction` of each class of the training subset as the validation set (bundle.val).

    `image_size` (0 = 224) is the crop side of streamed large-image data; in-memory data keeps
    its own size.
    """
    root = Path(data_dir) if data_dir else default_data_dir()
    if name in ("cifar10", "cifar100"):
        bundle = load_cifar(name, root, download)
    elif name in ("mnist", "fashion-mnist"):
        if not download and not root.is_dir():
            raise UserError(f"data dir {str(root)!r} " + ("is a file, not a folder" if
                            root.exists() else "does not exist") + f" (needed for {name})")
        bundle = load_mnist(name, root, download)
    elif name.startswith("imagefolder:"):
        path = name.split(":", 1)[1]
        if not path:
            raise UserError("imagefolder needs a path: imagefolder:PATH")
        bundle = load_imagefolder(path, augment, image_size)
    elif name == "synthetic":
        bundle = make_synthetic()
    elif name in ("imagenet", "imagenette"):
        # the names built-in studies use; the data itself is the user's copy
        raise UserError(f"dataset {name!r} is read from your copy: use imagefolder:PATH (in a "
                        f"study: --data-map {name}=imagefolder:PATH)")
    else:
        raise unknown("dataset", name, DATASETS)
    bundle.std = usable_std(bundle.name, bundle.std)
    bundle.train = _limit(bundle.train, limit_train)
    bundle.test = _limit(bundle.test, limit_test)
    return hold_out(bundle, val_fraction)


def data_for(cfg, bundle: DataBundle | None = None) -> DataBundle:
    """The data of a run with config `cfg` (a bnlab.config.RunConfig): `bundle` where the
    caller made one, with cfg's validation split held out as load_data holds it out (unless
    the bundle has one already), else load_data with the run's options."""
    if bundle is None:
        return load_data(cfg.dataset, cfg.data_dir or None, cfg.download, cfg.limit_train,
                         cfg.limit_test, cfg.augment, cfg.image_size, cfg.val_fraction)
    return bundle if bundle.val is not None else hold_out(bundle, cfg.val_fraction)


_FINGERPRINTS: dict[tuple[str, str], str | None] = {}


def fingerprint(name: str, data_dir: str | Path | None = None,
                download: bool = False) -> str | None:
    """What `load_data(name, data_dir).fingerprint` is, computed once per process and dataset:
    a hash of the files' bytes (CIFAR, MNIST), of an image folder's file names and sizes, or
    None for generated data. Run folders store it, so that a run is never resumed, or taken as
    done, with data other than its own (bnlab.train.record.RunRecord.check_data)."""
    root = Path(data_dir) if data_dir else default_data_dir()
    key = (name, str(root.resolve()))
    if key not in _FINGERPRINTS:
        if name.startswith("imagefolder:") and name.split(":", 1)[1]:
            _FINGERPRINTS[key] = folder_fingerprint(name.split(":", 1)[1])
        else:
            _FINGERPRINTS[key] = load_data(name, root, download).fingerprint
    return _FINGERPRINTS[key]


def _limit(split, limit: int):
    index = fixed_subset(len(split), limit)
    if index is None:
        return split
    if isinstance(split, Split):
        return split.subset(index)
    return torch.utils.data.Subset(split, index.tolist())


__all__ = ["DATASETS", "DataBundle", "Split", "load_data", "data_for", "default_data_dir",
           "fingerprint"]
