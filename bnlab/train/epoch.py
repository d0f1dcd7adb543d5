"""What both training loops (a lone run, bnlab.train.loop; the runs of a pack,
bnlab.train.packed) do the same way around an epoch: the device prelude, the epoch's result,
its metrics row (bnlab.store.EpochRow, what the report reads) and its log line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bnlab.config import RunConfig
from bnlab.fast.accel import memory_format_for, tune_cpu_allocator
from bnlab.fast.cpu_kernels import use_cpu_kernels
from bnlab.store import EpochRow


@dataclass
class EpochResult:
    """One epoch's training side of one run: sums over the global batch, or the step that
    diverged."""

    train_loss: float = float("nan")  # mean over the epoch's images (nats)
    train_acc: float = float("nan")  # top-1 fraction over the epoch's images
    images: int = 0  # training images of this run in the epoch
    seconds: float = 0.0  # wall time of the epoch's training steps
    step: int = 0  # optimizer steps done after this epoch
    lr: float = 0.0  # learning rate of the epoch's last step
    diverged_step: int | None = None


def prepare_device(cfg: RunConfig, device: torch.device, log: Callable[[str], None]):
    """The process-wide settings a run needs on `device` (CPU: the allocator, the fused
    kernels on or off); returns the memory format its tensors use."""
    if device.type == "cpu":
        tune_cpu_allocator()
    use_cpu_kernels(cfg.cpu_kernels and device.type == "cpu", log)
    return memory_format_for(device, cfg.model)


def epoch_row(epoch: int, res: EpochResult, test: dict[str, float],
              val: dict[str, float] | None, epoch_time: float,
              packed: int | None = None) -> EpochRow:
    """The metrics row of one finished epoch (`test`, `val`: bnlab.train.evaluate's loss, acc,
    acc5 of the epoch's end; `packed`: the pack's size, None for a lone run)."""
    return EpochRow(
        epoch=epoch, step=res.step, lr=res.lr, train_loss=res.train_loss,
        train_acc=res.train_acc, test_loss=test["loss"], test_acc=test["acc"],
        test_acc5=test.get("acc5"),
        val_loss=None if val is None else val["loss"],
        val_acc=None if val is None else val["acc"],
        epoch_time=epoch_time, train_images_per_s=res.images / res.seconds, packed=packed)


def epoch_line(run_id: str, epochs: int, row: EpochRow) -> str:
    """The log line of one finished epoch."""
    pack = "" if row.packed is None else f" (packed x{row.packed})"
    return (f"{run_id} epoch {row.epoch}/{epochs}  train loss {row.train_loss:.4f} acc "
            f"{row.train_acc:.4f}  test loss {row.test_loss:.4f} acc {row.test_acc:.4f}  "
            f"{row.train_images_per_s:.0f} img/s{pack}")
