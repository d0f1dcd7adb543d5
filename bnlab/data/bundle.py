"""What every dataset loader returns: uint8 arrays in memory, or a streamed torch Dataset."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


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
    # what the data is, independent of where it was read from: a hash of the files' bytes (or,
    # for large image folders, of their names and sizes); None for data made in memory
    fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def streamed(self) -> bool:
        return not isinstance(self.train, Split)


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


def fixed_subset(n_total: int, limit: int) -> torch.Tensor | None:
    """Indices of the first `limit` items under a fixed shuffle (seed 0), so subsets are mixed
    across classes and identical for every run; None when no limit applies."""
    if not limit or limit >= n_total:
        return None
    g = torch.Generator().manual_seed(0)
    return torch.randperm(n_total, generator=g)[:limit].sort().values
