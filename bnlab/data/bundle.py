"""What every dataset loader returns: uint8 arrays in memory, or a streamed torch Dataset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from bnlab.errors import UserError
from bnlab.store import warn

CHANNEL_NAMES = {1: ("grey",), 3: ("red", "green", "blue")}


@dataclass
class Split:
    """Images as uint8 (N, C, H, W) and int64 labels (N,), kept whole in memory."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.x[index], self.y[index])


@dataclass
class DataBundle:
    name: str
    classes: list[str]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, ...]
    train: Split | Dataset
    test: Split | Dataset
    flip: bool = True  # whether a horizontal flip keeps an image's label (not for digits)
    val: Split | Dataset | None = None  # held out from the training images (hold_out)
    # what the data is, independent of where it was read from: a hash of the files' bytes (or,
    # for large image folders, of their names and sizes); None for data made in memory
    fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def streamed(self) -> bool:
        return not isinstance(self.train, Split)


class Tensors(TensorDataset):
    """Images as a model takes them (already transformed and normalized by whoever made them)
    with their int64 labels, held in memory: the batches of a loader given from Python. Read
    like a streamed dataset (through a DataLoader, nothing normalized again), but never capped
    as streamed files are, since the images are in memory already."""


def tensor_bundle(x: torch.Tensor, y: torch.Tensor, name: str) -> DataBundle:
    """A DataBundle whose training and test sets are both the images `x` (N, C, ...) with
    labels `y` (N,), classes 0 .. max(y). Its mean and std (0 and 1 per channel) only say that
    the images are used as they are."""
    ds = Tensors(x, y)
    c = x.shape[1] if x.ndim > 1 else 1
    return DataBundle(name=name, classes=[str(k) for k in range(int(y.max()) + 1)],
                      in_channels=c, image_size=x.shape[-1] if x.ndim == 4 else 0,
                      mean=(0.0,) * c, std=(1.0,) * c, train=ds, test=ds, flip=False)


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images (N, C, H, W), scaled to [0,1].

    Sums are taken in int64, so the result does not depend on summation order.
    """
    means, stds = [], []
    n = x.shape[0] * x.shape[2] * x.shape[3]
    for c in range(x.shape[1]):
        s = 0
        ss = 0
        for chunk in torch.split(x[:, c], 4096):
            v = chunk.to(torch.int64)
            s += int(v.sum())
            ss += int((v * v).sum())
        mean = s / n
        var = ss / n - mean * mean
        means.append(mean / 255.0)
        stds.append(max(var, 0.0) ** 0.5 / 255.0)
    return tuple(means), tuple(stds)


def usable_std(name: str, std: tuple[float, ...]) -> tuple[float, ...]:
    """`std` with every channel that never varies in the training images (std 0, where
    normalizing would divide by zero and make every loss NaN) taken as 1, with one warning
    line naming the channels: such a channel is centred, and reaches the model as zeros."""
    flat = [c for c, s in enumerate(std) if not s > 0]  # 0, or NaN from a damaged entry
    if not flat:
        return tuple(std)
    names = CHANNEL_NAMES.get(len(std), ())
    said = ", ".join(f"{c} ({names[c]})" if c < len(names) else str(c) for c in flat)
    warn(f"channel{'s' if len(flat) > 1 else ''} {said} of the training images of {name!r} "
         f"never var{'y' if len(flat) > 1 else 'ies'} (std 0): normalized with std 1 instead "
         "of dividing by zero, so the model sees zeros there")
    return tuple(1.0 if c in flat else s for c, s in enumerate(std))


def fixed_subset(n_total: int, limit: int) -> torch.Tensor | None:
    """Indices of the first `limit` items under a fixed shuffle (seed 0), so subsets are mixed
    across classes and identical for every run; None when no limit applies."""
    if not limit or limit >= n_total:
        return None
    g = torch.Generator().manual_seed(0)
    return torch.randperm(n_total, generator=g)[:limit].sort().values


def labels_of(split) -> torch.Tensor:
    """The int64 labels of a Split, a StreamedImages-like dataset (`items` of (path, label)),
    or a Subset of either, without reading any image."""
    if isinstance(split, Split):
        return split.y
    if isinstance(split, Subset):
        return labels_of(split.dataset)[torch.as_tensor(split.indices, dtype=torch.int64)]
    items = getattr(split, "items", None)
    if items is None:
        raise TypeError(f"cannot read the labels of a {type(split).__name__}")
    return torch.tensor([label for _, label in items], dtype=torch.int64)


def stratified_hold_out(labels: torch.Tensor, fraction: float) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
    """(kept, held out) indices: round(fraction * n_c) images of each class c held out, chosen
    by a fixed shuffle (seed 0), so every run and seed holds out the same images. Both sorted."""
    g = torch.Generator().manual_seed(0)
    held = []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        k = int(round(fraction * len(idx)))
        held.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    out = torch.cat(held).sort().values if held else torch.empty(0, dtype=torch.int64)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[out] = False
    return mask.nonzero().flatten(), out


def _items_and_transform(split):
    """(items, the dataset holding them) of a StreamedImages-like dataset or a Subset of one."""
    if isinstance(split, Subset):
        items, base = _items_and_transform(split.dataset)
        return [items[i] for i in split.indices], base
    return list(split.items), split


def hold_out(bundle: DataBundle, fraction: float) -> DataBundle:
    """`bundle` with `fraction` of each class of its training images moved to `val`. In-memory
    data: a Split of them. Streamed data: the same files read with the test set's (evaluation)
    transform, so validation images are never augmented."""
    if not fraction:
        return bundle
    keep, held = stratified_hold_out(labels_of(bundle.train), fraction)
    if len(held) == 0 or len(keep) == 0:
        raise UserError(f"val_fraction {fraction} leaves no validation or no training images "
                        f"of the {len(labels_of(bundle.train))} training images")
    if isinstance(bundle.train, Split):
        return dataclasses.replace(bundle, train=bundle.train.subset(keep),
                                   val=bundle.train.subset(held))
    items, _ = _items_and_transform(bundle.train)
    _, test_base = _items_and_transform(bundle.test)
    val = type(test_base)([items[i] for i in held.tolist()], test_base.transform)
    return dataclasses.replace(bundle, train=Subset(bundle.train, keep.tolist()), val=val)
