"""Archives of small images read without extracting them (bnlab.data.archive): the same data,
order, statistics and identity as the extracted folder, and the same refusals."""

from __future__ import annotations

import gzip
import hashlib
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from bnlab import cli
from bnlab.data import load_data
from bnlab.data.archive import ArchiveOfLargeImages, read_small_images
from bnlab.data.imagefolder import EXTENSIONS, SMALL_MAX, extract_archive, folder_fingerprint
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


def _broken_deflate(tar_bytes: bytes, n: int) -> bytes:
    """A .tar.gz whose deflate stream holds the first `n` bytes of `tar_bytes` and then a block
    of the reserved type 3, which zlib refuses ('invalid block type')."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = c.compress(tar_bytes[:n]) + c.flush(zlib.Z_FULL_FLUSH) + b"\x07"
    with pytest.raises(zlib.error, match="invalid block type"):  # the damage is zlib's to see
        zlib.decompress(body, -15)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body + bytes(8)


def _one_line_refusal(capsys, archive, words):
    capsys.readouterr()
    rc = cli.main(["train", "--dataset", f"imagefolder:{archive}", "--out",
                   str(archive.parent / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and str(archive) in err and words in err, err
    assert err.count("\n") == 1


@pytest.mark.parametrize("where", ["first header", "member data"])
def test_a_corrupt_deflate_stream_is_refused_in_one_line(tmp_path, monkeypatch, capsys, where):
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "f")
    # a member larger than any read buffer: the damage is met while reading or skipping its
    # data, where tarfile passes zlib's error on as it is
    big = tmp_path / "f" / "train" / "cat" / "zz-notes.bin"
    big.write_bytes(np.random.default_rng(1).bytes(200_000))
    tar = tmp_path / "d.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tmp_path / "f", arcname="data")
        offset = tf.getmember(f"data/{big.relative_to(tmp_path / 'f')}").offset_data
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(_broken_deflate(tar.read_bytes(),
                                    100 if where == "first header" else offset + 100_000))
    with pytest.raises(UserError, match=f"cannot read '{bad}'.*invalid block type"):
        read_small_images(bad, EXTENSIONS, SMALL_MAX)
    with pytest.raises(UserError, match=f"cannot .* '{bad}'.*invalid block type"):
        extract_archive(bad)
    assert not list((tmp_path / "cache" / "extracted").iterdir())  # nothing half-extracted
    _one_line_refusal(capsys, bad, "invalid block type")


def _with_bad_header(tar: bytes, member: tarfile.TarInfo) -> bytes:
    b = bytearray(tar)
    b[member.offset + 148] ^= 1  # a digit of the header's checksum field
    return bytes(b)


@pytest.mark.parametrize("gz", [False, True])
def test_a_damaged_header_is_refused_not_read_as_the_end(tmp_path, monkeypatch, capsys, gz):
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path / "cache"))
    _folder(tmp_path / "f")
    tar = tmp_path / "d.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(tmp_path / "f", arcname="data")
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    victim = [m for m in members if m.name.endswith(".png")][-2]  # the last image but one
    bad = tmp_path / ("bad.tar.gz" if gz else "bad.tar")
    data = _with_bad_header(tar.read_bytes(), victim)
    bad.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    with tarfile.open(bad) as tf:  # tarfile alone stops there as if the archive ended
        assert tf.getnames() == [m.name for m in members[:members.index(victim)]]
    words = f"damaged at byte {victim.offset} of its tar data"
    with pytest.raises(UserError, match=words):
        read_small_images(bad, EXTENSIONS, SMALL_MAX)
    with pytest.raises(UserError, match=words):
        extract_archive(bad)
    assert not list((tmp_path / "cache" / "extracted").iterdir())
    _one_line_refusal(capsys, bad, words)


def test_a_gzip_crc_mismatch_is_refused(tmp_path):
    _folder(tmp_path / "f")
    good = _tar(tmp_path / "f", tmp_path / "d.tar.gz").read_bytes()
    bad = tmp_path / "crc.tar.gz"
    bad.write_bytes(good[:-8] + bytes([good[-8] ^ 1]) + good[-7:])  # the trailer's CRC-32
    with pytest.raises(UserError, match="cannot read .*CRC check failed"):
        read_small_images(bad, EXTENSIONS, SMALL_MAX)


def test_an_archive_without_folder_entries_has_the_folders_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "f"
    _folder(folder)
    (folder / "train" / "cow").mkdir()  # sorts between cat and dog: shifts their labels
    (folder / "train" / "cow" / "readme.txt").write_text("no image here")
    archive = tmp_path / "list.tar"  # as `tar -T filelist`: file members only
    with tarfile.open(archive, "w") as tf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                tf.add(p, arcname=f"data/{p.relative_to(folder)}", recursive=False)
    with tarfile.open(archive) as tf:
        assert not any(m.isdir() for m in tf)
    got = read_small_images(archive, EXTENSIONS, SMALL_MAX)
    assert got["classes"] == ["cat", "cow", "dog", "emu"]
    a, b = load_data(f"imagefolder:{archive}"), load_data(f"imagefolder:{folder}")
    assert a.classes == b.classes == ["cat", "cow", "dog", "emu"]
    assert a.train.y.tolist() == b.train.y.tolist() == [0] * 4 + [2] * 4 + [3] * 4
    assert torch.equal(a.train.x, b.train.x) and a.fingerprint == b.fingerprint


def _expected_identity(root, classes, sample_sizes=False):
    """The documented identity, computed here from the files: class names; per split its
    name, every (relative path, label), then every file's bytes (or, for large images, its
    byte size)."""
    h = hashlib.blake2b("\x00".join(classes).encode(), digest_size=16)
    for split in ("train", "val"):
        files = [(p, label) for label, c in enumerate(classes)
                 for p in sorted((root / split / c).glob("*.png"))]
        h.update(("train" if split == "train" else "test").encode())
        for p, label in files:
            h.update(f"{p.relative_to(root)}\x00{label}\x00".encode())
        for p, _ in files:
            h.update(str(p.stat().st_size).encode() if sample_sizes else p.read_bytes())
    return "imagefolder:" + h.hexdigest()


def test_the_identity_is_the_documented_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path / "cache"))
    small, big = tmp_path / "small", tmp_path / "big"
    _folder(small)
    _folder(big, size=(80, 70), n=2)
    want = _expected_identity(small, ["cat", "dog", "emu"])
    assert load_data(f"imagefolder:{small}").fingerprint == want
    assert load_data(f"imagefolder:{_tar(small, tmp_path / 's.tar')}").fingerprint == want
    assert folder_fingerprint(str(big)) == _expected_identity(big, ["cat", "dog", "emu"], True)
