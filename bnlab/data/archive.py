"""Small images read straight from a .tar/.tar.gz of an ImageNet-style folder, without extracting
it: one pass over the archive decodes every image in memory.

Extracting CIFAR-10's 60,000 JPEGs writes 60,000 files (about 10 s on the 2-core reference
machine) only for them to be read back once; reading the members as they stream by takes half
the time of extracting alone. The result is exactly what extracting and reading the folder gives
(bnlab.data.imagefolder): the same classes, the same order of images (classes sorted, files
sorted by name within a class), the same RGB pixels, the same refusals, and the same identity
hash, so a run's data fingerprint does not depend on which way its data was read.

Archives of large images (the first image more than SMALL_MAX px a side) are not read here:
they stream from an extracted folder (`ArchiveOfLargeImages`).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import posixpath
import tarfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from bnlab.errors import UserError

EVAL_DIRS = ("val", "test")  # the first that exists is the evaluation split
SPLITS = ("train", *EVAL_DIRS)
# What reading a damaged archive raises: tarfile's errors, gzip's (BadGzipFile, an OSError, on a
# bad CRC; EOFError when cut short), and the decompressors' own errors, which tarfile passes on
# unchanged while reading members (zlib.error for a corrupt deflate stream, LZMAError for .xz).
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


class ArchiveOfLargeImages(Exception):
    """The archive's first image is larger than the small-image limit: extract it instead."""


def decode_image(source, shown: str, mode: str = "RGB") -> Image.Image:
    """Open and fully decode an image (a path or a binary file), converted to `mode`, or raise
    a UserError naming it. An image above Pillow's decompression-bomb limit
    (Image.MAX_IMAGE_PIXELS) is refused in that one line, whether Pillow would only have
    warned (up to twice the limit, two lines of its own on stderr) or refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                im.load()
                return im.convert(mode)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UserError(f"image {shown!r} is too large to decode safely: {e} (Pillow's limit "
                        "against decompression bombs)") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise UserError(f"corrupt image {shown!r}: {e}") from None


def _decode(data: bytes, shown: str) -> Image.Image:
    return decode_image(io.BytesIO(data), shown)


def member_parts(name: str, archive: Path) -> tuple[str, ...]:
    """The folders and file name of archive member `name` below the archive's root, as
    extracting it places it ("ds/train/../x.png" is "ds/x.png", "./a" is "a"): the one
    reading of a member's path that both readers use. A member that would land outside the
    root (an absolute path, or one that climbs out with "..") is refused, naming it."""
    norm = posixpath.normpath(name) if name else "."
    if name.startswith("/") or norm == ".." or norm.startswith("../"):
        raise UserError(f"{str(archive)!r} holds the member {name!r}, a path outside the "
                        "archive's folder (absolute, or climbing out with '..'); bnlab reads "
                        "no such archive")
    return () if norm == "." else tuple(norm.split("/"))


def unreadable(archive: Path, e: BaseException, doing: str = "read") -> UserError:
    """The one-line refusal of an archive that raised `e` (one of READ_ERRORS). tarfile's
    "r:*" open lists every method it tried on lines of their own: they are joined into one."""
    lines = [line.strip(" -") for line in str(e).splitlines() if line.strip(" -")]
    why = " ".join(lines[:1] + ["; ".join(lines[1:])]).strip() or type(e).__name__
    return UserError(f"cannot {doing} {str(archive)!r}: {why}")


def check_end(tf: tarfile.TarFile, archive: Path) -> None:
    """Refuse `archive` unless all that follows the last member `tf` read is zero padding.

    tarfile ends its member list at the first header it cannot read (a bad checksum, a cut) just
    as at the end-of-archive marker, so one damaged header would silently drop every member
    after it. Reading the stream to its end also makes gzip check its CRC and length."""
    f, at = tf.fileobj, tf.offset  # offset: the header tarfile stopped at
    f.seek(at)
    while chunk := f.read(1 << 20):
        rest = chunk.lstrip(b"\0")
        if rest:
            at += len(chunk) - len(rest)
            raise UserError(f"cannot read {str(archive)!r}: damaged at byte {at} of its tar "
                            "data (a member header that cannot be read, or data after the end "
                            "marker); the members after it would be lost")
        at += len(chunk)


def read_small_images(archive: Path, extensions: set[str], small_max: int,
                      image_size: int = 0) -> dict:
    """{"classes", "train": (x, y), "test": (x, y), "size": (w, h), "identity"} of the archive,
    x uint8 (N, 3, H, W), y int64 (N,). Raises ArchiveOfLargeImages (before decoding more than
    one image) when its first image is larger than `small_max` px, and the UserErrors the
    folder reader raises for the same mistakes."""
    found: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # split -> class -> name -> pixels
    raw: dict[str, bytes] = {}  # relative path -> file bytes (the identity hashes them)
    # (top folder, split, class) of every class folder, seen as a folder entry or as the folder
    # of any member below it: an archive made from a file list has no folder entries, and a
    # class folder holding no image still counts in the extracted folder
    folders: set[tuple[str, str, str]] = set()
    prefix: str | None = None
    size: tuple[int, int] | None = None
    try:
        with tarfile.open(archive) as tf:
            for m in tf:
                parts = member_parts(m.name, archive)
                if not parts:
                    continue
                # root/train/<class>/<file>, root "" or a single top folder
                top = "" if parts[0] in SPLITS else parts[0]
                rel = parts if top == "" else parts[1:]
                if len(rel) < 2 or rel[0] not in SPLITS:
                    continue
                if len(rel) >= 3 or m.isdir():
                    folders.add((top, rel[0], rel[1]))
                if len(rel) != 3 or not m.isfile() or \
                        PurePosixPath(rel[2]).suffix.lower() not in extensions:
                    continue
                if prefix is None:
                    prefix = top
                elif top != prefix:
                    raise UserError(f"{str(archive)!r} holds more than one dataset folder "
                                    f"({prefix or '.'} and {top})")
                data = tf.extractfile(m).read()
                shown = f"{archive}:{m.name}"
                im = _decode(data, shown)
                if size is None:
                    if max(im.size) > small_max:
                        raise ArchiveOfLargeImages(shown)
                    size = (image_size, image_size) if image_size else im.size
                if im.size != size:
                    if not image_size:
                        raise other_size(shown, im.size, size)
                    im = im.resize(size, Image.BILINEAR)
                split, cls, name = rel
                found.setdefault(split, {}).setdefault(cls, {})[name] = \
                    np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
                raw["/".join(rel)] = data
            check_end(tf, archive)
    except READ_ERRORS as e:
        raise unreadable(archive, e) from None
    tops = {t for t, _, _ in folders}
    if prefix is None and len(tops) == 1:  # no image at all: name the one dataset folder
        prefix = tops.pop()
    for top, split, cls in folders:
        if top == prefix:
            found.setdefault(split, {}).setdefault(cls, {})
    shown = f"{archive}:{prefix or ''}"
    if "train" not in found:
        raise no_train(shown)
    eval_split = next((d for d in EVAL_DIRS if d in found), None)
    if eval_split is None:
        raise no_eval_split(shown)
    classes = sorted(found["train"])
    if len(classes) < 2:
        raise too_few_classes(shown + "/train", classes)
    extra = sorted(set(found[eval_split]) - set(classes))
    if extra:
        raise not_in_train(shown + "/" + eval_split, extra)

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int]]]:
        xs, ys, items = [], [], []
        for label, c in enumerate(classes):
            for name in sorted(found[split].get(c, {})):
                xs.append(found[split][c][name])
                ys.append(label)
                items.append((f"{split}/{c}/{name}", label))
        x = np.stack(xs) if xs else np.empty((0, 3, 1, 1), dtype=np.uint8)
        return x, np.array(ys, dtype=np.int64), items

    xtr, ytr, train_items = arrays("train")
    xte, yte, test_items = arrays(eval_split)
    if not train_items or not test_items:
        raise no_images(shown, "train" if not train_items else eval_split, extensions)
    return {"classes": classes, "train": (xtr, ytr), "test": (xte, yte), "size": size,
            "identity": identity_of(classes, train_items, test_items, raw.__getitem__)}


def identity_of(classes: list[str], train: list[tuple[str, int]], test: list[tuple[str, int]],
                content: Callable[[str], bytes], sample: int = 0) -> str:
    """The identity hash of an image dataset (bnlab.data.imagefolder describes what it covers),
    from relative paths: the class names; per split its name, every (path, label), then
    `content(path)` of every file, or of `sample` files spread evenly (0 = all). The one copy
    both readers use, so an archive and its extracted folder cannot drift apart."""
    h = hashlib.blake2b("\x00".join(classes).encode(), digest_size=16)
    for split, items in (("train", train), ("test", test)):
        h.update(split.encode())
        for rel, label in items:
            h.update(f"{rel}\x00{label}\x00".encode())
        for rel, _ in (items[:: max(1, len(items) // sample)] if sample else items):
            h.update(content(rel))
    return h.hexdigest()


# The refusals both readers share (the folder in bnlab.data.imagefolder, the archive here),
# worded once so that the same mistake reads the same whichever way the data is read.

def no_train(shown: str) -> UserError:
    return UserError(f"image folder {shown!r} has no train/ subfolder; expected "
                     "train/<class>/*.jpg and val/<class>/*.jpg (or test/)")


def no_eval_split(shown: str) -> UserError:
    return UserError(f"image folder {shown!r} has no val/ or test/ subfolder")


def too_few_classes(shown: str, classes: list[str]) -> UserError:
    return UserError(f"image folder {shown!r} has {len(classes)} class subfolder(s) "
                     f"({', '.join(classes) or 'none'}); a classification dataset needs at "
                     "least 2")


def not_in_train(shown: str, extra: list[str]) -> UserError:
    return UserError(f"{shown!r} has class folders missing from train/: {', '.join(extra[:5])}")


def no_images(shown: str, split: str, extensions) -> UserError:
    return UserError(f"image folder {shown!r} has no images in {split}/ (accepted extensions: "
                     f"{', '.join(sorted(extensions))})")


def other_size(shown: str, got: tuple[int, int], first: tuple[int, int]) -> UserError:
    return UserError(f"image {shown!r} is {got[0]}x{got[1]} px, but the dataset's first image "
                     f"is {first[0]}x{first[1]}: small images are kept in memory at one size; "
                     "make them one size, or pass --image-size N (every image is then resized "
                     "to NxN)")
