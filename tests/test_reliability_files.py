"""Untrusted data files: what bnlab reads from a user's disk never runs code, and a damaged or
forged file ends in one line naming it (CIFAR pickles, MNIST IDX, checkpoints, caches)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct

import numpy as np
import pytest
import torch
from conftest import write_cifar, write_idx, write_image_folder, write_mnist
from helpers import ERROR, one_line_error

from bnlab.data import load_data
from bnlab.data.cache import load_arrays, load_json, save_arrays
from bnlab.data.cifar import OFFICIAL, SafeUnpickler
from bnlab.errors import UserError
from bnlab.store import load_checkpoint_file


class Payload:
    """Unpickling this calls `func(*args)`: what a hostile file would do."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _marker_payloads(marker):
    code = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "os.system": Payload(__import__("os").system, f"touch {marker}"),
        "builtins.exec": Payload(exec, code),
        "builtins.eval": Payload(eval, code),
        "subprocess.call": Payload(__import__("subprocess").call, ["touch", str(marker)]),
        "pathlib write": Payload(__import__("pathlib").Path(marker).write_text, "ran"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.eval",
                                  "subprocess.call", "pathlib write"])
def test_malicious_cifar_pickle_is_refused_and_never_runs(tmp_path, capsys, kind):
    write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3"
    d = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2],
         b"batch_label": _marker_payloads(marker)[kind]}
    batch.write_bytes(pickle.dumps(d))
    line = one_line_error(capsys, ["train", "--dataset", "cifar10", "--data-dir",
                                   tmp_path / "data", "--out", tmp_path / "o"],
                          "refused CIFAR file", "data_batch_3", start=ERROR)
    assert "a CIFAR pickle never holds" in line
    assert not marker.exists()  # the payload did not run
    assert not list((tmp_path / "o").glob("*/config.json"))  # no run folder was made


def test_restricted_unpickler_reads_every_protocol_of_real_arrays():
    """Protocol 2 (Python 2's official files and _codecs-encoded bytes), 4 and 5 (out-of-band
    buffers through _frombuffer) give back the same values as pickle itself."""
    d = {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072), b"labels": [3, 9],
         b"batch_label": b"mine", b"filenames": [b"a.png", b"b.png"], b"f": 1.5}
    for protocol in (2, 3, 4, 5):
        raw = pickle.dumps(d, protocol=protocol)
        got = SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
        assert np.array_equal(got[b"data"], d[b"data"]) and got[b"data"].dtype == np.uint8
        assert {k: v for k, v in got.items() if k != b"data"} == \
            {k: v for k, v in d.items() if k != b"data"}


def test_file_claiming_to_be_official_must_have_its_md5(tmp_path, capsys):
    write_cifar(tmp_path / "data")
    base = tmp_path / "data" / "cifar-10-batches-py"
    label, md5 = OFFICIAL["cifar10"]["test_batch"]
    d = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"batch_label": label}
    raw = pickle.dumps(d, protocol=2)
    (base / "test_batch").write_bytes(raw)
    line = one_line_error(capsys, ["train", "--dataset", "cifar10", "--data-dir",
                                   tmp_path / "data", "--out", tmp_path / "o"],
                          "test_batch", md5, hashlib.md5(raw).hexdigest(), start=ERROR)
    assert "damaged or altered" in line
    # the same content under its own label is a user's file and is read
    d[b"batch_label"] = b"my test batch"
    (base / "test_batch").write_bytes(pickle.dumps(d, protocol=2))
    assert len(load_data("cifar10", tmp_path / "data").test) == 4


@pytest.mark.parametrize("damage, needle", [
    (lambda d: {**d, b"labels": [10] * len(d[b"labels"])}, "outside 0..9"),
    (lambda d: {**d, b"labels": d[b"labels"][:-1]}, "labels for"),
    (lambda d: {**d, b"data": d[b"data"].astype(np.float32)}, "expected uint8"),
    (lambda d: {**d, b"data": d[b"data"][:, :100]}, "expected uint8 (N, 3072)"),
    (lambda d: [1, 2, 3], "holds a list"),
    (lambda d: {**d, b"labels": ["x"] * len(d[b"labels"])}, "not integers"),
])
def test_damaged_cifar_contents_are_one_line(tmp_path, capsys, damage, needle):
    write_cifar(tmp_path / "data")
    p = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_2"
    with open(p, "rb") as f:
        d = pickle.load(f)
    p.write_bytes(pickle.dumps(damage(d)))
    one_line_error(capsys, ["train", "--dataset", "cifar10", "--data-dir", tmp_path / "data",
                            "--out", tmp_path / "o"], "data_batch_2", needle, start=ERROR)


def test_truncated_cifar_file_is_one_line(tmp_path, capsys):
    write_cifar(tmp_path / "data")
    p = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    p.write_bytes(p.read_bytes()[:500])
    one_line_error(capsys, ["train", "--dataset", "cifar10", "--data-dir", tmp_path / "data",
                            "--out", tmp_path / "o"], "cannot read CIFAR file", "data_batch_1",
                   start=ERROR)


def test_mnist_forged_and_damaged_files_are_one_line(tmp_path, capsys):
    root = tmp_path / "m"
    write_mnist(root, gz=False)
    argv = ["train", "--dataset", "mnist", "--data-dir", root, "--out", tmp_path / "o"]
    img = root / "train-images-idx3-ubyte"
    good = img.read_bytes()
    # a header whose dimensions multiply past 2^64: exact arithmetic, not a wrapped size
    img.write_bytes(bytes([0, 0, 8, 4]) + struct.pack(">IIII", *[2**32 - 1] * 4) + b"\0" * 16)
    one_line_error(capsys, argv, "train-images-idx3-ubyte", "header says", start=ERROR)
    img.write_bytes(good)
    labels = root / "train-labels-idx1-ubyte"
    write_idx(labels, np.full(60, 11, np.uint8), gz=False)
    one_line_error(capsys, argv, "go up to 11", "0..9", start=ERROR)
    write_idx(labels, np.zeros(60, np.uint8), gz=False)
    gz = root / "t10k-images-idx3-ubyte"
    gz.unlink()
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(good)[:40])
    one_line_error(capsys, argv, "t10k-images-idx3-ubyte.gz", start=ERROR)


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "config": {}, "x": Payload(exec, f"open({str(marker)!r}, 'w')")}, p)
    with pytest.raises(UserError, match="holds objects other than tensors and is not loaded"):
        load_checkpoint_file(p)
    assert not marker.exists()


def test_damaged_cache_entries_are_rebuilt_never_trusted(tmp_path):
    p = tmp_path / "c" / "x.npz"
    save_arrays(p, a=np.arange(3))
    assert np.array_equal(load_arrays(p)["a"], np.arange(3))
    p.write_bytes(p.read_bytes()[:30])  # torn
    assert load_arrays(p) is None
    np.savez(p, a=np.array([{"x": 1}], dtype=object))  # an object array would need pickle
    assert load_arrays(p) is None
    j = tmp_path / "c" / "s.json"
    j.write_bytes(b"{\"mean\": [0.1, ")
    assert load_json(j) is None


def test_image_folder_cache_damage_is_decoded_again(tmp_path):
    pixels = write_image_folder(tmp_path / "imgs")
    b1 = load_data(f"imagefolder:{tmp_path / 'imgs'}")
    from bnlab.config import cache_root

    for entry in (cache_root() / "decoded").iterdir():
        entry.write_bytes(b"garbage")
    b2 = load_data(f"imagefolder:{tmp_path / 'imgs'}")
    assert torch.equal(b1.train.x, b2.train.x)
    first = sorted(p for p in pixels if "/train/" in p)[0]
    assert np.array_equal(b2.train.x[0].permute(1, 2, 0).numpy(), pixels[first])


def test_decompression_bomb_is_one_line(tmp_path, capsys, monkeypatch):
    from PIL import Image

    write_image_folder(tmp_path / "imgs", size=16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 16x16 > 2 x 50: a "bomb"
    one_line_error(capsys, ["train", "--dataset", f"imagefolder:{tmp_path / 'imgs'}",
                            "--out", tmp_path / "o"], "too large to decode safely", ".png",
                   start=ERROR)
