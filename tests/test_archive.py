"""Archives of small images read without extracting them (bnlab.data.archive): the same data,
order, statistics and identity as the extracted folder, and the same refusals."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from bnlab.data import load_data
from bnlab.data.archive import ArchiveOfLargeImages, read_small_images
from bnlab.data.imagefolder import EXTENSIONS, SMALL_MAX, folder_fingerprint
from bnlab.errors import UserError


def _folder(root, size=(8, 8), classes=("cat", "dog", "emu"), n=4, eval_dir="val",
            odd=None):
    rng = np.random.default_rng(0)
    for split, count in (("train", n), (eval_dir, 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                px = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                name = root / split / c / f"{i:03d}.png"
                if odd is not None and (split, c, i) == odd[0]:
                    Image.fromarray(px).convert(odd[1]).resize(odd[2]).save(name)
                else:
                    Image.fromarray(px).save(name)
    (root / "train" / classes[-1] / "notes.txt").write_text("not an image")


def _tar(folder, out, top="data"):
    with tarfile.open(out, "w:gz") as tf:
        tf.add(folder, arcname=top)
    return out


def test_an_archive_reads_as_its_extracted_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "f"
    _folder(folder, odd=(("train", "dog", 1), "L", (8, 8)))  # a grey image: read as RGB
    (folder / "train" / "fox").mkdir()  # a class without images still counts, as in folders
    archive = _tar(folder, tmp_path / "d.tar.gz")
    a = load_data(f"imagefolder:{archive}")  # read straight from the archive
    assert not (tmp_path / "cache" / "extracted").exists()
    b = load_data(f"imagefolder:{folder}")
    assert a.classes == b.classes == ["cat", "dog", "emu", "fox"]
    for split in ("train", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).y, getattr(b, split).y)
    assert a.mean == b.mean and a.std == b.std and a.image_size == b.image_size == 8
    assert a.fingerprint == b.fingerprint  # the identity does not depend on the way read
    assert folder_fingerprint(str(archive)) == a.fingerprint
    again = load_data(f"imagefolder:{archive}")  # from the cache
    assert torch.equal(again.train.x, a.train.x) and again.fingerprint == a.fingerprint


def test_archive_refusals_match_the_folder_reader(tmp_path):
    mixed = tmp_path / "mixed"
    _folder(mixed, odd=(("train", "emu", 2), "RGB", (9, 8)))
    with pytest.raises(UserError, match="is 9x8 px, but the dataset's first image is 8x8"):
        read_small_images(_tar(mixed, tmp_path / "m.tar"), EXTENSIONS, SMALL_MAX)
    resized = read_small_images(tmp_path / "m.tar", EXTENSIONS, SMALL_MAX, image_size=6)
    assert resized["train"][0].shape == (12, 3, 6, 6)
    one = tmp_path / "one"
    _folder(one, classes=("only",))
    with pytest.raises(UserError, match="needs at least 2"):
        read_small_images(_tar(one, tmp_path / "o.tar"), EXTENSIONS, SMALL_MAX)
    noeval = tmp_path / "noeval"
    _folder(noeval, eval_dir="train")
    with pytest.raises(UserError, match="no val/ or test/ subfolder"):
        read_small_images(_tar(noeval, tmp_path / "n.tar"), EXTENSIONS, SMALL_MAX)
    bad = tmp_path / "bad"
    _folder(bad)
    (bad / "train" / "cat" / "000.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="corrupt image .*train/cat/000.png"):
        read_small_images(_tar(bad, tmp_path / "b.tar"), EXTENSIONS, SMALL_MAX)


def test_an_archive_of_large_images_is_extracted_and_streamed(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path / "cache"))
    big = tmp_path / "big"
    _folder(big, size=(80, 70), n=2)
    archive = _tar(big, tmp_path / "big.tar.gz", top="x")
    with pytest.raises(ArchiveOfLargeImages):
        read_small_images(archive, EXTENSIONS, SMALL_MAX)
    b = load_data(f"imagefolder:{archive}", image_size=32)
    assert b.streamed and (tmp_path / "cache" / "extracted").is_dir()
    assert b.fingerprint == load_data(f"imagefolder:{big}", image_size=32).fingerprint
