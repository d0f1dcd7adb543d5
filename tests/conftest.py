"""Shared fixtures: small files in each official dataset format, written by the tests."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.data.synthetic import make_synthetic


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own decode cache; the user's decoded data is never touched.
    The fused CPU kernels' build (keyed by source, flags, CPU and torch, the same for every
    session on this machine) is shared through a link to this machine's build folder, so that a
    session does not spend tens of seconds compiling what an earlier one built."""
    mp = pytest.MonkeyPatch()
    own = tmp_path_factory.mktemp("bnlab-cache")
    shared = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                          "bnlab", "ext")
    try:
        os.makedirs(shared, exist_ok=True)
        os.symlink(shared, own / "ext")
    except OSError:  # a read-only home: this session builds its own
        pass
    mp.setenv("BNLAB_CACHE", str(own))
    mp.delenv("BNLAB_DATA", raising=False)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _no_cgroup_quota(monkeypatch, tmp_path_factory):
    """Tests that fake the cores this process may use (its affinity) get that many: a CPU quota
    of the machine running the tests (a container's) is not read in-process
    (tests/test_machine.py fakes its own)."""
    from bnlab import machine

    monkeypatch.setattr(machine, "PROC_CGROUP", tmp_path_factory.getbasetemp() / "no-cgroup")


@pytest.fixture(autouse=True)
def _threads_restored():
    """A test that runs a study in-process (which sets torch's thread count for its runs) leaves
    the count as it found it for the tests after it."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small():
    """A small synthetic dataset (32 training, 16 test images of 8 px), one per test file."""
    return make_synthetic(n_train=32, n_test=16, size=8)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from a second one, and on a busy CPU the
    thread pool mostly waits. Test files opt in with pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_cifar(root: Path, name: str = "cifar10", n_per_batch: int = 20, seed: int = 0):
    """Write CIFAR-10/100 pickles in torchvision's layout; returns (train x, train y, test x, y)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, k = ["test_batch"], b"labels", 10
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        base = root / "cifar-100-python"
        train_files, test_files, label_key, k = ["train"], ["test"], b"fine_labels", 100
        meta = ("meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"g{i}".encode() for i in range(20)]})
    base.mkdir(parents=True)
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = [], []
        for f in files:
            x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            y = rng.integers(0, k, n_per_batch).tolist()
            d = {b"data": x, label_key: y, b"batch_label": f.encode()}
            if name == "cifar100":
                d[b"coarse_labels"] = [v // 5 for v in y]
            with open(base / f, "wb") as fh:
                pickle.dump(d, fh)
            xs.append(x)
            ys += y
        out[split] = (np.concatenate(xs).reshape(-1, 3, 32, 32), np.array(ys))
    with open(base / meta[0], "wb") as fh:
        pickle.dump(meta[1], fh)
    return out


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist(root: Path, gz: bool = True, n_train: int = 60, n_test: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for stem_img, stem_lbl, n in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte", n_train),
                                  ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(root / stem_img, x, gz)
        write_idx(root / stem_lbl, y, gz)
        arrays[stem_img] = (x, y)
    return arrays


def write_image_folder(root: Path, size: int = 16, n_per_class: int = 4, classes=("a", "b", "c"),
                       eval_name: str = "val", fmt: str = "PNG", seed: int = 0):
    """An ImageNet-style folder; PNG keeps pixels exact so tests can compare decoded values."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = {}
    for split in ("train", eval_name):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n_per_class):
                a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                ext = "png" if fmt == "PNG" else "jpg"
                p = d / f"{i:04d}.{ext}"
                Image.fromarray(a).save(p, format=fmt)
                pixels[str(p)] = a
    return pixels
