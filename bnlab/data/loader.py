"""Batches for training and evaluation.

In-memory data (`Split`) lives as uint8 on the training device; shuffling, the pad-and-crop, the
flip and the normalization are done there on whole batches. The random numbers come from a CPU
generator seeded by (seed, epoch), so an epoch's batches are the same on every device and after
a resume. Streamed data goes through a DataLoader whose shuffling is seeded the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bnlab.data.bundle import DataBundle, Split
from bnlab.fast import cpu_kernels

PAD = 4  # px of zero padding before the random crop (He et al. 2016)
CHUNK_BYTES = 64 << 20  # float32 input prepared at once by MemoryLoader
MAX_CHUNK_BATCHES = 32


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_plan(n: int, seed: int, epoch: int, augment: bool, flip: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The random draws of one training epoch, on the CPU: the order of the n images, and (with
    augmentation) each image's crop offsets (n, 2) and flip flags (n,), indexed by image."""
    g = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=g)
    if not augment:
        return order, None, None
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
    flips = (torch.rand(n, generator=g) < 0.5) & flip
    return order, offsets, flips


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor,
              pad: int = PAD) -> torch.Tensor:
    """Zero-pad (N, C, H, W) by `pad`, crop at `offsets` (N, 2: row, col), flip where `flips`."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = xp[batch, :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2)


class Normalizer:
    """uint8 -> float: (x / 255 - mean) / std per channel, as one multiply-add."""

    def __init__(self, mean, std, device, memory_format=torch.contiguous_format):
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t
        self.memory_format = memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32).mul_(self.scale).add_(self.shift)
        return x.contiguous(memory_format=self.memory_format)


class MemoryLoader:
    """Batches of a device-resident Split."""

    def __init__(self, split: Split, bundle: DataBundle, batch_size: int, device: torch.device,
                 train: bool, augment: bool, seed: int = 0,
                 memory_format=torch.contiguous_format):
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.augment = augment and train
        self.flip = bundle.flip
        self.seed = seed
        self.norm = Normalizer(bundle.mean, bundle.std, device, memory_format)

    def __len__(self) -> int:
        n = len(self.y)
        if self.train:  # the last partial batch is dropped in training (BN needs > 1 sample)
            return max(1, n // self.batch_size)
        return (n + self.batch_size - 1) // self.batch_size

    def chunk_batches(self) -> int:
        """Batches prepared at once: as many as fit in CHUNK_BYTES of float32 input, at most
        MAX_CHUNK_BATCHES. One gather, crop, flip and normalization then serves that many
        steps, so a step launches no data kernels of its own (on a GPU each launch costs host
        time the step waits for)."""
        per_batch = self.batch_size * self.x[0].numel() * 4
        return max(1, min(MAX_CHUNK_BATCHES, CHUNK_BYTES // max(1, per_batch)))

    def _fused(self) -> bool:
        """Batches made by the fused CPU kernel: CPU, uint8 images, channels_last output."""
        return (cpu_kernels.active() and self.device.type == "cpu"
                and self.x.dtype == torch.uint8 and self.x.dim() == 4
                and self.x.is_contiguous() and self.norm.memory_format == torch.channels_last)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, bs = len(self.y), self.batch_size
        if self.train:
            order, offsets, flips = epoch_plan(n, self.seed, epoch, self.augment, self.flip)
            if self.augment:
                offsets, flips = offsets.to(self.device), flips.to(self.device)
            order = order.to(self.device)
        steps, per = len(self), self.chunk_batches()
        fused = self._fused()
        for c0 in range(0, steps, per):
            lo, hi = c0 * bs, min(n, min(c0 + per, steps) * bs)  # training: full batches
            if fused:  # the same values from one C++ pass (bnlab.fast.cpu_kernels)
                idx = order[lo:hi] if self.train else torch.arange(lo, hi)
                aug = self.train and self.augment
                x = cpu_kernels.crop_flip_normalize(
                    self.x, idx, offsets[idx] if aug else None, flips[idx] if aug else None,
                    self.norm.scale, self.norm.shift, PAD if aug else 0)
                y = self.y[idx]
            elif self.train:
                idx = order[lo:hi]
                x = self.x[idx]
                if self.augment:
                    x = crop_flip(x, offsets[idx], flips[idx])
                x, y = self.norm(x), self.y[idx]
            else:
                x, y = self.norm(self.x[lo:hi]), self.y[lo:hi]
            for b in range(0, hi - lo, bs):  # views: rows of the chunk, layout kept
                yield x[b:b + bs], y[b:b + bs]


class StreamLoader:
    """A DataLoader over a streamed Dataset; shuffling and worker seeds follow (seed, epoch)."""

    def __init__(self, dataset, batch_size: int, device: torch.device, train: bool,
                 workers: int, seed: int = 0, memory_format=torch.contiguous_format):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.train, self.workers, self.seed = train, workers, seed
        self.memory_format = memory_format

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.train:
            return max(1, n // self.batch_size)
        return (n + self.batch_size - 1) // self.batch_size

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        dl = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=self.train,
            drop_last=self.train and len(self.dataset) >= self.batch_size,
            num_workers=self.workers, generator=epoch_generator(self.seed, epoch),
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for x, y in dl:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)


def make_loader(bundle: DataBundle, train: bool, batch_size: int, device: torch.device,
                augment: bool, seed: int, workers: int = 4,
                memory_format=torch.contiguous_format, split=None):
    """Batches of the training set (train=True: shuffled, augmented, last partial batch
    dropped) or, in order, of the test set or `split` (e.g. bundle.val)."""
    if split is None:
        split = bundle.train if train else bundle.test
    if isinstance(split, Split):
        return MemoryLoader(split, bundle, batch_size, device, train, augment, seed,
                            memory_format)
    return StreamLoader(split, batch_size, device, train, workers, seed, memory_format)
