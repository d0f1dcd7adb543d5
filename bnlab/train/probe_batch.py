"""The fixed probe batch: the images the activation probes are measured on.

On a probe step's own training batch (60 images in Ioffe & Szegedy's MNIST setting) a
percentile of a unit's input moves from one probe to the next by sampling noise alone, as much
as the drift it is meant to show. The probes therefore measure activations on one batch of
RunConfig.probe_images held-out images, drawn once: the first probe_images of the validation
split (the test split when there is none) under a fixed shuffle (seed PROBE_SEED, independent of
the run's seed), so every probe step, every arm and every seed of a study sees the same images.
The images are normalized as evaluation images (no augmentation).

Making the batch must not move the run's trajectory: it reads no data through the training
loader and runs inside torch's fork_rng (a streamed split's DataLoader draws its base seed from
the global generator).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.data import Subset

from bnlab.data.bundle import DataBundle, Split
from bnlab.data.loader import make_loader

PROBE_SEED = 0  # the shuffle that picks the probe images; not the run's seed


@dataclass
class ProbeBatch:
    x: torch.Tensor
    y: torch.Tensor
    split: str  # "validation" | "test"
    index: torch.Tensor  # positions of the images in that split, sorted

    def describe(self) -> str:
        return f"{len(self.y)} {self.split} images (fixed, the same for every step and seed)"


def probe_indices(n_total: int, n: int) -> torch.Tensor:
    """The first min(n, n_total) positions of a fixed shuffle of n_total, sorted."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randperm(n_total, generator=g)[: min(n, n_total)].sort().values


def probe_batch(bundle: DataBundle, n: int, device: torch.device,
                memory_format=torch.contiguous_format) -> ProbeBatch | None:
    """The fixed probe batch of `bundle` (None when n is 0 or the split is empty)."""
    split, name = (bundle.val, "validation") if bundle.val is not None else (bundle.test, "test")
    if n <= 0 or len(split) == 0:
        return None
    index = probe_indices(len(split), n)
    part = split.subset(index) if isinstance(split, Split) else Subset(split, index.tolist())
    with torch.random.fork_rng(devices=[]):
        loader = make_loader(bundle, False, len(index), device, False, PROBE_SEED, 0,
                             memory_format, split=part)
        xs, ys = zip(*loader.epoch(0))
    x, y = torch.cat(xs), torch.cat(ys)
    return ProbeBatch(x.contiguous(memory_format=memory_format), y, name, index)


@torch.no_grad()
def measure_on(model: torch.nn.Module, batch: ProbeBatch, precision: str = "fp32") -> None:
    """One forward pass of `model` on the probe batch, as it stands (training mode: batch
    statistics, dropout active), for the hooks that record activations. The RNG it draws from
    (dropout) and every buffer it moves (BN running statistics, batch counts) are put back bit
    for bit, so the training step that follows is the one an unprobed run takes."""
    x = batch.x
    devices = [x.device] if x.device.type == "cuda" else []
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    ctx = (torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())
    try:
        with torch.random.fork_rng(devices=devices), ctx:
            model(x)
    finally:
        for b, value in saved:
            b.copy_(value)
