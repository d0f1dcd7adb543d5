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
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from bnlab.errors import UserError

EVAL_DIRS = ("val", "test")  # the first that exists is the evaluation split


class ArchiveOfLargeImages(Exception):
    """The archive's first image is larger than the small-image limit: extract it instead."""


def _decode(data: bytes, shown: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise UserError(f"corrupt image {shown!r}: {e}") from None


def read_small_images(archive: Path, extensions: set[str], small_max: int,
                      image_size: int = 0) -> dict:
    """{"classes", "train": (x, y), "test": (x, y), "size": (w, h), "identity"} of the archive,
    x uint8 (N, 3, H, W), y int64 (N,). Raises ArchiveOfLargeImages (before decoding more than
    one image) when its first image is larger than `small_max` px, and the UserErrors the
    folder reader raises for the same mistakes."""
    found: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # split -> class -> name -> pixels
    raw: dict[str, bytes] = {}  # relative path -> file bytes (the identity hashes them)
    prefix: str | None = None
    size: tuple[int, int] | None = None
    try:
        with tarfile.open(archive) as tf:
            for m in tf:
                parts = PurePosixPath(m.name).parts
                if m.isdir():  # a class folder counts even when it holds no image
                    rel = parts if parts and parts[0] in ("train", *EVAL_DIRS) else parts[1:]
                    if len(rel) == 2 and rel[0] in ("train", *EVAL_DIRS):
                        found.setdefault(rel[0], {}).setdefault(rel[1], {})
                    continue
                if not m.isfile():
                    continue
                if len(parts) < 3 or PurePosixPath(m.name).suffix.lower() not in extensions:
                    continue
                # root/train/<class>/<file>, root "" or a single top folder
                top = "" if parts[0] in ("train", *EVAL_DIRS) else parts[0]
                rel = parts if top == "" else parts[1:]
                if len(rel) != 3 or rel[0] not in ("train", *EVAL_DIRS):
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
                        raise UserError(
                            f"image {shown!r} is {im.size[0]}x{im.size[1]} px, but the "
                            f"dataset's first image is {size[0]}x{size[1]}: small images are "
                            "kept in memory at one size; make them one size, or pass "
                            "--image-size N (every image is then resized to NxN)")
                    im = im.resize(size, Image.BILINEAR)
                split, cls, name = rel
                found.setdefault(split, {}).setdefault(cls, {})[name] = \
                    np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
                raw["/".join(rel)] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"cannot read {str(archive)!r}: {e}") from None
    shown = f"{archive}:{prefix or ''}"
    if "train" not in found:
        raise UserError(f"image folder {shown!r} has no train/ subfolder; expected "
                        "train/<class>/*.jpg and val/<class>/*.jpg (or test/)")
    eval_split = next((d for d in EVAL_DIRS if d in found), None)
    if eval_split is None:
        raise UserError(f"image folder {shown!r} has no val/ or test/ subfolder")
    classes = sorted(found["train"])
    if len(classes) < 2:
        raise UserError(f"image folder {shown + '/train'!r} has {len(classes)} class "
                        f"subfolder(s) ({', '.join(classes) or 'none'}); a classification "
                        "dataset needs at least 2")
    extra = sorted(set(found[eval_split]) - set(classes))
    if extra:
        raise UserError(f"{shown + '/' + eval_split!r} has class folders missing from train/: "
                        f"{', '.join(extra[:5])}")

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
        which = "train" if not train_items else eval_split
        raise UserError(f"image folder {shown!r} has no images in {which}/ (accepted "
                        f"extensions: {', '.join(sorted(extensions))})")
    return {"classes": classes, "train": (xtr, ytr), "test": (xte, yte), "size": size,
            "identity": identity_of(classes, train_items, test_items, raw)}


def identity_of(classes: list[str], train: list[tuple[str, int]], test: list[tuple[str, int]],
                data: dict[str, bytes]) -> str:
    """bnlab.data.imagefolder's identity hash of small images, from relative paths and bytes:
    the class names; per split its name, every (path, label), then every file's bytes."""
    h = hashlib.blake2b("\x00".join(classes).encode(), digest_size=16)
    for split, items in (("train", train), ("test", test)):
        h.update(split.encode())
        for rel, label in items:
            h.update(f"{rel}\x00{label}\x00".encode())
        for rel, _ in items:
            h.update(data[rel])
    return h.hexdigest()
