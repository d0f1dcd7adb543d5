"""ImageNet-style folders: `root/train/<class>/*` and `root/val/<class>/*` (or `test/`).

Small images (at most 64 px a side, like CIFAR-10 as JPEG) are decoded once into a uint8 cache
and trained from memory; larger ones stream through a DataLoader with torchvision transforms.
A `.tar`/`.tar.gz` archive of such a folder is extracted once into the cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms as T

from bnlab.config import cache_root
from bnlab.data.bundle import DataBundle, Split, channel_stats
from bnlab.data.cache import key_of, load_arrays, save_arrays
from bnlab.errors import UserError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
SMALL_MAX = 64  # px: at most this on both sides -> decoded once and kept in memory
LARGE_SIZE = 224  # px: training crop and evaluation size of streamed images
STATS_SAMPLE = 2000  # images sampled to estimate the channel statistics of streamed data


def open_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open and fully decode an image, or raise a UserError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise UserError(f"corrupt image {str(path)!r}: {e}") from None


def extract_archive(archive: Path) -> Path:
    """Extract a tar archive once into the cache and return the dataset root inside it."""
    st = archive.stat()
    dest = cache_root() / "extracted" / key_of(archive.resolve(), st.st_size, st.st_mtime_ns)
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
            os.replace(tmp, dest)
        except (tarfile.TarError, OSError, EOFError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if dest.is_dir():  # another process finished first
                return find_root(dest, archive)
            raise UserError(f"cannot extract {str(archive)!r}: {e}") from None
    return find_root(dest, archive)


def find_root(folder: Path, shown: Path) -> Path:
    """The folder that holds train/ (the folder itself or its single subfolder)."""
    if (folder / "train").is_dir():
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subs) == 1 and (subs[0] / "train").is_dir():
        return subs[0]
    raise UserError(f"image folder {str(shown)!r} has no train/ subfolder; expected "
                    "train/<class>/*.jpg and val/<class>/*.jpg (or test/)")


def scan(root: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Classes (sorted train/ subfolders) and (path, label) lists of the train and eval splits."""
    eval_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if eval_dir is None:
        raise UserError(f"image folder {str(root)!r} has no val/ or test/ subfolder")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"image folder {str(root / 'train')!r} has no class subfolders")

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
            raise UserError(f"{str(split_dir)!r} has class folders missing from train/: "
                            f"{', '.join(extra[:5])}")
        return out

    train, test = files(root / "train"), files(eval_dir)
    if not train or not test:
        which = "train" if not train else eval_dir.name
        raise UserError(f"image folder {str(root)!r} has no images in {which}/ "
                        f"(accepted extensions: {', '.join(sorted(EXTENSIONS))})")
    return classes, train, test


def _decode_all(items: list[tuple[str, int]], size: tuple[int, int], mode: str) -> Split:
    channels = 1 if mode == "L" else 3
    x = np.empty((len(items), channels, size[1], size[0]), dtype=np.uint8)

    def work(i: int) -> None:
        im = open_image(items[i][0], mode)
        if im.size != size:
            im = im.resize(size, Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        x[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        list(pool.map(work, range(len(items))))
    y = np.array([label for _, label in items], dtype=np.int64)
    return Split(torch.from_numpy(x), torch.from_numpy(y))


def _fingerprint(items: list[tuple[str, int]]) -> str:
    st = [os.stat(p) for p, _ in items[:: max(1, len(items) // 200)]]
    return key_of(len(items), items[0][0], items[-1][0],
                  *(f"{s.st_size}:{s.st_mtime_ns}" for s in st))


class StreamedImages(Dataset):
    """(path, label) pairs decoded on access and passed through a torchvision transform."""

    def __init__(self, items: list[tuple[str, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(open_image(path)), label


def large_transforms(mean, std, train: bool, augment: bool, size: int = LARGE_SIZE):
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if train and augment:
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size), *norm])


def _stream_stats(items, root_key: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    path = cache_root() / "stats" / f"{root_key}.json"
    if path.is_file():
        d = json.loads(path.read_text())
        return tuple(d["mean"]), tuple(d["std"])
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(items), generator=g)[:STATS_SAMPLE].tolist()
    tf = T.Compose([T.Resize(int(round(LARGE_SIZE * 256 / 224))), T.CenterCrop(LARGE_SIZE)])
    mean, std = channel_stats(_decode_with([items[i] for i in pick], tf))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"mean": mean, "std": std, "n": len(pick)}))
    os.replace(tmp, path)
    return mean, std


def _decode_with(items, tf) -> torch.Tensor:
    arrs = [np.asarray(tf(open_image(p)), dtype=np.uint8).transpose(2, 0, 1) for p, _ in items]
    return torch.from_numpy(np.stack(arrs))


def load_imagefolder(spec: str, augment: bool = True, image_size: int = 0) -> DataBundle:
    """Small images decoded into memory; larger ones streamed at `image_size` (0 = 224) px:
    RandomResizedCrop + flip for training, resize to size x 256/224 + center crop for eval."""
    raw = Path(spec).expanduser()
    if not raw.exists():
        raise UserError(f"image folder {spec!r} does not exist")
    if raw.is_file():
        if not tarfile.is_tarfile(raw):
            raise UserError(f"{spec!r} is neither a folder nor a .tar/.tar.gz archive of one")
        root = extract_archive(raw)
    else:
        root = find_root(raw, raw)
    classes, train_items, test_items = scan(root)
    with Image.open(train_items[0][0]) as first:
        size, mode = first.size, ("L" if first.mode in ("L", "1", "I;16") else "RGB")
    name = f"imagefolder:{spec}"
    if max(size) <= SMALL_MAX:
        key = key_of(root.resolve(), _fingerprint(train_items), _fingerprint(test_items), size,
                     mode)
        cpath = cache_root() / "decoded" / f"{key}.npz"
        cached = load_arrays(cpath)
        if cached is None:
            train = _decode_all(train_items, size, mode)
            test = _decode_all(test_items, size, mode)
            save_arrays(cpath, xtr=train.x.numpy(), ytr=train.y.numpy(), xte=test.x.numpy(),
                        yte=test.y.numpy())
        else:
            train = Split(torch.from_numpy(cached["xtr"]), torch.from_numpy(cached["ytr"]))
            test = Split(torch.from_numpy(cached["xte"]), torch.from_numpy(cached["yte"]))
        mean, std = channel_stats(train.x)
        return DataBundle(name, classes, train.x.shape[1], size[0], mean, std, train, test)
    mean, std = _stream_stats(train_items, key_of(root.resolve(), _fingerprint(train_items)))
    side = image_size or LARGE_SIZE
    train_ds = StreamedImages(train_items, large_transforms(mean, std, True, augment, side))
    test_ds = StreamedImages(test_items, large_transforms(mean, std, False, augment, side))
    return DataBundle(name, classes, 3, side, mean, std, train_ds, test_ds)
