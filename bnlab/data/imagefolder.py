"""ImageNet-style folders: `root/train/<class>/*` and `root/val/<class>/*` (or `test/`).

Small images (at most 64 px a side, like CIFAR-10 as JPEG) are decoded once into a uint8 cache
and trained from memory; larger ones stream through a DataLoader with torchvision transforms.
A `.tar`/`.tar.gz` archive of such a folder is extracted once into the cache.

The dataset is read as a whole, not by its first file: every image becomes RGB (a grey or
palette image is converted, so one odd file cannot make the dataset one-channel), and small
images must all have one size (a file of another size is refused, naming it) unless the run
asks for a size (`image_size`), to which each one is then resized.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bnlab.config import cache_root
from bnlab.data.archive import (
    READ_ERRORS,
    ArchiveOfLargeImages,
    check_end,
    decode_image,
    identity_of,
    member_parts,
    no_eval_split,
    no_images,
    no_train,
    not_in_train,
    other_size,
    read_small_images,
    too_few_classes,
    unreadable,
)
from bnlab.data.bundle import DataBundle, Split, channel_stats, usable_std
from bnlab.data.cache import key_of, load_arrays, load_json, save_arrays, save_json
from bnlab.errors import UserError, storage_error

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
SMALL_MAX = 64  # px: at most this on both sides -> decoded once and kept in memory
LARGE_SIZE = 224  # px: training crop and evaluation size of streamed images
STATS_SAMPLE = 2000  # images sampled to estimate the channel statistics of streamed data
IDENTITY_SAMPLE = 5000  # files whose byte sizes enter the data fingerprint (all names do)
COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: what tarfile opens


def open_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open and fully decode an image, or raise a UserError naming the file."""
    return decode_image(path, str(path), mode)


def extract_archive(archive: Path) -> Path:
    """Extract a tar archive once into the cache and return the dataset root inside it."""
    st = archive.stat()
    dest = cache_root() / "extracted" / key_of(archive.resolve(), st.st_size, st.st_mtime_ns)
    if not dest.is_dir():
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
        except OSError as e:
            raise storage_error(dest.parent, e) from None
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter=lambda m, dest: _member_filter(m, dest, archive))
                check_end(tf, archive)
            os.replace(tmp, dest)
        except UserError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except READ_ERRORS as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if dest.is_dir():  # another process finished first
                return find_root(dest, archive)
            if isinstance(e, OSError) and e.filename is not None and e.strerror:
                raise storage_error(tmp, e) from None  # the cache's disk, not the archive
            raise unreadable(archive, e, "extract") from None
    return find_root(dest, archive)


def _member_filter(member: tarfile.TarInfo, dest: str, archive: Path) -> tarfile.TarInfo:
    """tarfile's `data` filter (no links out of the folder, no device files), after refusing a
    member path the direct reader refuses too (bnlab.data.archive.member_parts): the data
    filter alone would silently strip an absolute path's leading "/"."""
    member_parts(member.name, archive)
    return tarfile.data_filter(member, dest)


def is_archive(path: Path) -> bool:
    """tarfile.is_tarfile, except that a compressed file tarfile cannot open is refused with
    tarfile's reason: a .tar.gz damaged in its first blocks is a damaged archive, not "neither
    a folder nor an archive" (and is_tarfile lets zlib's and lzma's own errors through)."""
    try:
        if tarfile.is_tarfile(path):
            return True
        with open(path, "rb") as f:
            if not f.read(6).startswith(COMPRESSED):
                return False
        tarfile.open(path).close()
    except READ_ERRORS as e:
        raise unreadable(path, e) from None
    return False


def find_root(folder: Path, shown: Path) -> Path:
    """The folder that holds train/ (the folder itself or its single subfolder)."""
    if (folder / "train").is_dir():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / "train").is_dir():
        return subs[0]
    raise no_train(str(shown))


def scan(root: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Classes (sorted train/ subfolders) and (path, label) lists of the train and eval splits."""
    eval_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if eval_dir is None:
        raise no_eval_split(str(root))
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if len(classes) < 2:
        raise too_few_classes(str(root / "train"), classes)

    def files(split_dir: Path) -> list[tuple[str, int]]:
        out = []
        for label, c in enumerate(classes):
            d = split_dir / c
            if d.is_dir():
                out.extend((str(p), label) for p in sorted(d.iterdir())
                           if p.suffix.lower() in EXTENSIONS)
        extra = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in
                       classes)
        if extra:
            raise not_in_train(str(split_dir), extra)
        return out

    train, test = files(root / "train"), files(eval_dir)
    if not train or not test:
        raise no_images(str(root), "train" if not train else eval_dir.name, EXTENSIONS)
    return classes, train, test


def _decode_all(items: list[tuple[str, int]], size: tuple[int, int], resize: bool) -> Split:
    """Every image as RGB uint8 (N, 3, H, W) of `size` (width, height): resized to it when
    `resize`, else refused (one line naming the file) when it has another size."""
    x = np.empty((len(items), 3, size[1], size[0]), dtype=np.uint8)

    def work(i: int) -> None:
        im = open_image(items[i][0])
        if im.size != size:
            if not resize:
                raise other_size(items[i][0], im.size, size)
            im = im.resize(size, Image.BILINEAR)
        x[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)

    # one thread: decoding a 32 px JPEG is too short for threads to pay (measured on 2 cores:
    # 60,000 images in 8.7 s alone, 11 s with 2 or 4 threads)
    for i in range(len(items)):
        work(i)
    y = np.array([label for _, label in items], dtype=np.int64)
    return Split(torch.from_numpy(x), torch.from_numpy(y))


def _fingerprint(items: list[tuple[str, int]]) -> str:
    """The decode cache's key part for `items`: sampled sizes and modification times (a file
    changed in place gets a new cache entry)."""
    st = [os.stat(p) for p, _ in items[:: max(1, len(items) // 200)]]
    return key_of(len(items), items[0][0], items[-1][0],
                  *(f"{s.st_size}:{s.st_mtime_ns}" for s in st))


def identity(root: Path, classes: list[str], train: list[tuple[str, int]],
             test: list[tuple[str, int]]) -> str:
    """`_identity`, remembered in the cache under every file's path, size and modification
    time: hashing 60,000 small files' bytes again costs seconds on every run of a study, and
    any file written since changes its modification time."""
    stats = hashlib.blake2b(str(root.resolve()).encode(), digest_size=16)
    for items in (train, test):
        for p, label in items:
            try:
                st = os.stat(p)
            except OSError as e:
                raise UserError(f"cannot read image {p!r}: {e.strerror}") from None
            stats.update(f"{p}\x00{label}\x00{st.st_size}\x00{st.st_mtime_ns}\x00".encode())
    stats.update("\x00".join(classes).encode())
    path = cache_root() / "identity" / f"{stats.hexdigest()}.json"
    known = load_json(path)
    if isinstance(known, dict) and isinstance(known.get("identity"), str):
        return known["identity"]
    value = _identity(root, classes, train, test)
    save_json(path, {"identity": value})
    return value


def _identity(root: Path, classes: list[str], train: list[tuple[str, int]],
              test: list[tuple[str, int]]) -> str:
    """What the dataset is, wherever it lies: every file's path relative to `root` with its
    label, the class names, and the files' bytes: all of them for small images (they are read
    whole anyway), the byte sizes of up to IDENTITY_SAMPLE files spread evenly for large ones
    (so a copy or a fresh extraction matches, while other data, or the same names re-encoded
    at another resolution, do not). Modification times are left out on purpose: they change
    with every copy."""
    small = max(open_image(train[0][0]).size) <= SMALL_MAX
    path_of = {os.path.relpath(p, root): p for p, _ in (*train, *test)}

    def content(rel: str) -> bytes:
        p = path_of[rel]
        try:
            return Path(p).read_bytes() if small else str(os.path.getsize(p)).encode()
        except OSError as e:
            raise UserError(f"cannot read image {p!r}: {e.strerror}") from None

    def relative(items: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return [(os.path.relpath(p, root), label) for p, label in items]

    return identity_of(classes, relative(train), relative(test), content,
                       sample=0 if small else IDENTITY_SAMPLE)


class StreamedImages(Dataset):
    """(path, label) pairs decoded on access and passed through a torchvision transform."""

    def __init__(self, items: list[tuple[str, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(open_image(path)), label


def _transforms():
    """torchvision.transforms, imported on first use: small images never need it, and importing
    torchvision takes a second or more (bnlab.models.names.torchvision_blocks)."""
    from torchvision import transforms

    return transforms


def large_transforms(mean, std, train: bool, augment: bool, size: int = LARGE_SIZE):
    T = _transforms()
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if train and augment:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), *norm])


def _stream_stats(items, root_key: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = cache_root() / "stats" / f"{root_key}.json"
    d = load_json(path)
    if isinstance(d, dict) and _stats_ok(d.get("mean")) and _stats_ok(d.get("std")):
        return tuple(d["mean"]), tuple(d["std"])
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(items), generator=g)[:STATS_SAMPLE].tolist()
    T = _transforms()
    tf = T.Compose([T.Resize(int(round(LARGE_SIZE * 256 / 224))), T.CenterCrop(LARGE_SIZE)])
    mean, std = channel_stats(_decode_with([items[i] for i in pick], tf))
    save_json(path, {"mean": mean, "std": std, "n": len(pick)})
    return mean, std


def _stats_ok(v) -> bool:
    """A cached mean or std: three finite numbers (std > 0 is checked by the division)."""
    return (isinstance(v, list) and len(v) == 3
            and all(isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 1
                    for x in v))


def _decode_with(items, tf) -> torch.Tensor:
    arrs = [np.asarray(tf(open_image(p)), dtype=np.uint8).transpose(2, 0, 1) for p, _ in items]
    return torch.from_numpy(np.stack(arrs))


def dataset_root(spec: str) -> Path:
    """The folder holding train/ of an imagefolder PATH (an archive extracted once)."""
    raw = Path(spec).expanduser()
    if not raw.exists():
        raise UserError(f"image folder {spec!r} does not exist")
    if raw.is_file():
        if not is_archive(raw):
            raise UserError(f"{spec!r} is neither a folder nor a .tar/.tar.gz archive of one")
        return extract_archive(raw)
    return find_root(raw, raw)


def folder_fingerprint(spec: str) -> str:
    """DataBundle.fingerprint of imagefolder:`spec`, from the file list alone (no decoding);
    for an archive of small images read directly, the identity recorded when it was read."""
    raw = Path(spec).expanduser()
    if raw.is_file():
        known = load_json(_archive_identity_path(raw))
        if isinstance(known, dict) and isinstance(known.get("identity"), str):
            return f"imagefolder:{known['identity']}"
    root = dataset_root(spec)
    return f"imagefolder:{identity(root, *scan(root))}"


def load_imagefolder(spec: str, augment: bool = True, image_size: int = 0) -> DataBundle:
    """Small images (the first at most SMALL_MAX px a side) decoded into memory, at their one
    common size or resized to `image_size` (0 = their own; above SMALL_MAX they stream);
    larger ones streamed at `image_size` (0 = 224) px: RandomResizedCrop + flip for training,
    resize to size x 256/224 + center crop for eval. Every image is read as RGB. An archive of
    small images is read without extracting it (bnlab.data.archive)."""
    raw = Path(spec).expanduser()
    if raw.is_file() and image_size <= SMALL_MAX and is_archive(raw):
        bundle = _small_archive(raw, spec, image_size)
        if bundle is not None:
            return bundle
    root = dataset_root(spec)
    classes, train_items, test_items = scan(root)
    first = open_image(train_items[0][0]).size
    fingerprint = f"imagefolder:{identity(root, classes, train_items, test_items)}"
    name = f"imagefolder:{spec}"
    if max(first) <= SMALL_MAX and image_size <= SMALL_MAX:
        size = (image_size, image_size) if image_size else first
        key = key_of(root.resolve(), _fingerprint(train_items), _fingerprint(test_items), size,
                     "rgb", bool(image_size))
        cpath = cache_root() / "decoded" / f"{key}.npz"
        cached = load_arrays(cpath)
        if cached is None or not _arrays_ok(cached, size, len(train_items), len(test_items)):
            train = _decode_all(train_items, size, resize=bool(image_size))
            test = _decode_all(test_items, size, resize=bool(image_size))
            mean, std = channel_stats(train.x)
            save_arrays(cpath, xtr=train.x.numpy(), ytr=train.y.numpy(), xte=test.x.numpy(),
                        yte=test.y.numpy(), mean=np.array(mean), std=np.array(std))
        else:
            train = Split(torch.from_numpy(cached["xtr"]), torch.from_numpy(cached["ytr"]))
            test = Split(torch.from_numpy(cached["xte"]), torch.from_numpy(cached["yte"]))
            if "mean" in cached and "std" in cached:  # computed when the entry was written
                mean, std = tuple(cached["mean"].tolist()), tuple(cached["std"].tolist())
            else:
                mean, std = channel_stats(train.x)
        return DataBundle(name, classes, 3, size[0], mean, std, train, test,
                          fingerprint=fingerprint)
    mean, std = _stream_stats(train_items, key_of(root.resolve(), _fingerprint(train_items)))
    std = usable_std(name, std)  # before the transforms take it
    side = image_size or LARGE_SIZE
    train_ds = StreamedImages(train_items, large_transforms(mean, std, True, augment, side))
    test_ds = StreamedImages(test_items, large_transforms(mean, std, False, augment, side))
    return DataBundle(name, classes, 3, side, mean, std, train_ds, test_ds,
                      fingerprint=fingerprint)


def _arrays_ok(a: dict, size: tuple[int, int], n_train: int, n_test: int) -> bool:
    """A cache entry of the expected shapes and types (anything else is decoded again)."""
    want = {"xtr": (n_train, 3, size[1], size[0]), "xte": (n_test, 3, size[1], size[0]),
            "ytr": (n_train,), "yte": (n_test,)}
    return all(k in a and a[k].shape == shape for k, shape in want.items()) and \
        a["xtr"].dtype == np.uint8 and a["xte"].dtype == np.uint8 and \
        a["ytr"].dtype == np.int64 and a["yte"].dtype == np.int64


def _archive_key(archive: Path, *extra) -> str:
    st = archive.stat()
    return key_of(archive.resolve(), st.st_size, st.st_mtime_ns, *extra)


def _archive_identity_path(archive: Path) -> Path:
    return cache_root() / "identity" / f"archive-{_archive_key(archive)}.json"


def _small_archive(archive: Path, spec: str, image_size: int) -> DataBundle | None:
    """The bundle of an archive of small images, decoded straight from it once and then from
    the cache; None when its images are large (they are extracted and streamed)."""
    cpath = cache_root() / "decoded" / f"archive-{_archive_key(archive, image_size)}.npz"
    a = load_arrays(cpath)
    classes = _class_names(a)
    if classes is None or not all(k in a for k in ("xtr", "ytr", "xte", "yte", "mean", "std",
                                                    "identity")):
        try:
            got = read_small_images(archive, EXTENSIONS, SMALL_MAX, image_size)
        except ArchiveOfLargeImages:
            return None
        (xtr, ytr), (xte, yte) = got["train"], got["test"]
        mean, std = channel_stats(torch.from_numpy(xtr))
        classes = got["classes"]
        # the class names as JSON: any name a folder can have survives, a newline included
        a = {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte, "mean": np.array(mean),
             "std": np.array(std), "identity": np.frombuffer(got["identity"].encode(), np.uint8),
             "class_names": np.frombuffer(json.dumps(classes).encode(), np.uint8)}
        save_arrays(cpath, **a)
        save_json(_archive_identity_path(archive), {"identity": got["identity"]})
    train = Split(torch.from_numpy(a["xtr"]), torch.from_numpy(a["ytr"]))
    test = Split(torch.from_numpy(a["xte"]), torch.from_numpy(a["yte"]))
    return DataBundle(f"imagefolder:{spec}", classes, 3, train.x.shape[-1],
                      tuple(a["mean"].tolist()), tuple(a["std"].tolist()), train, test,
                      fingerprint=f"imagefolder:{bytes(a['identity']).decode()}")


def _class_names(a: dict | None) -> list[str] | None:
    """The class names a cache entry holds (None: an entry without them, or of an older
    layout, which is read again from the archive)."""
    try:
        names = json.loads(bytes(a["class_names"]).decode())
    except (KeyError, TypeError, ValueError):
        return None
    ok = isinstance(names, list) and all(isinstance(n, str) for n in names)
    return names if ok else None
