"""A generated dataset for tests: one random template per class plus noise, uint8 32x32 RGB.

Templates are random 4x4 colour patterns enlarged to the image size, so they differ in colour
and coarse layout: a convolutional net with global pooling separates them within a few epochs.
Fully determined by its seed, so tests need no files at all.
"""

from __future__ import annotations

import torch

from bnlab.data.bundle import DataBundle, Split, channel_stats


def make_synthetic(n_train: int = 1024, n_test: int = 512, num_classes: int = 10,
                   size: int = 32, channels: int = 3, noise: float = 60.0,
                   seed: int = 1234) -> DataBundle:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g) * 255
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")

    def split(n: int) -> Split:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = templates[y] + noise * torch.randn(n, channels, size, size, generator=g)
        return Split(x.clamp(0, 255).round().to(torch.uint8), y)

    train, test = split(n_train), split(n_test)
    mean, std = channel_stats(train.x)
    return DataBundle("synthetic", [f"class{i}" for i in range(num_classes)], channels, size,
                      mean, std, train, test, flip=True)
