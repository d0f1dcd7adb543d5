"""Data-parallel training: torchrun's environment, DistributedDataParallel, sharded batches.

Distributed mode is read from the variables torchrun (or SLURM through submitit) sets: RANK,
WORLD_SIZE and LOCAL_RANK. When they are set, a run is one process per device in a process group:
backend NCCL on CUDA GPUs, gloo on the CPU.

Batches. `batch_size` is the GLOBAL batch B: with N processes each one gets B / N images per step
(B must be divisible by N). DDP averages the gradients of the N per-process mean losses, which
is the gradient of the mean loss over all B images, so a norm that works per sample (group,
layer, none) trains exactly as on one device with batch B. BatchNorm does not: each process
normalizes over its own B / N images (the "per-device normalization batch"), unless `sync_bn`
turns the layers into SyncBatchNorm, which normalizes over all B.

Sharding. Device-resident data (MemoryLoader) draws the same global order from the (seed, epoch)
generator on every process, and process r takes images [r * B/N, (r+1) * B/N) of every global
batch: the union of the shards is the single-process batch, and a ghost-batch norm whose ghost
size divides B / N sees the same ghost batches as on one device. Streamed data uses a
DistributedSampler seeded with (seed, epoch).

Running statistics. Each process updates its norms' running statistics from its own shard;
after every optimizer step the floating-point buffers are averaged over the processes (DDP's
default would instead copy rank 0's at the next forward, discarding the other shards). Since
every process starts the step from the same buffers and the update is linear (running <- (1 -
f) running + f batch_stat), the average equals one update with the mean of the shard statistics.
So BN without sync_bn on N processes is exactly ghost BN with virtual batch B / N on one device,
running statistics included, and a ghost norm under DDP matches its single-device run.

Evaluation runs on every process over a contiguous 1/N of the test set (no padding, so no image
counts twice); the sums of loss, top-1 and top-5 hits are all-reduced, so the result is the
single-process one up to summation order while taking 1/N of the time. All processes hold the
same buffers, so the evaluated model is exactly the one rank 0 checkpoints.

Only rank 0 logs and writes the store; the other processes get the resume state from rank 0
through a broadcast, so multi-node runs need no shared file system for the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from bnlab.data import fingerprint
from bnlab.data.bundle import DataBundle, Split
from bnlab.data.loader import epoch_generator
from bnlab.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a data-parallel job (world_size 1 = not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (or submitit's export), even with 1 process

    @property
    def enabled(self) -> bool:
        """A process group is used: any launched job, so a 1-process torchrun run takes the
        same DDP / SyncBN path as a multi-process one."""
        return self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """The one place that reads the launcher's environment (torchrun, or submitit's export)."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as set by torchrun), "
                        f"got {env.get('RANK')!r}, {env.get('WORLD_SIZE')!r}, "
                        f"{env.get('LOCAL_RANK')!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK {rank} is not within WORLD_SIZE {world}")
    return DistEnv(rank, world, local, launched="WORLD_SIZE" in env)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class Context:
    """What a run needs to know about the other processes; a no-op for world_size 1."""

    def __init__(self, env: DistEnv, device: torch.device):
        self.env, self.device = env, device
        self.backend = backend_for(device) if env.enabled else None

    # -- roles ---------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        return log if self.is_main else (lambda _msg: None)

    def per_device_batch(self, batch_size: int) -> int:
        return batch_size // self.env.world_size

    def describe(self, batch_size: int, sync_bn: bool) -> dict[str, Any]:
        """Recorded in config.json: how the global batch was split and normalized."""
        local = self.per_device_batch(batch_size)
        return {"world_size": self.env.world_size, "backend": self.backend,
                "global_batch": batch_size, "per_device_batch": local,
                "sync_bn": sync_bn, "norm_batch": batch_size if sync_bn else local}

    def banner(self, batch_size: int, sync_bn: bool) -> str | None:
        if not self.env.enabled:
            return None
        d = self.describe(batch_size, sync_bn)
        how = "SyncBatchNorm over the global batch" if sync_bn else "BN over each device's share"
        return (f"data parallel: {d['world_size']} processes ({d['backend']}), global batch "
                f"{batch_size}, {d['per_device_batch']} per device; normalization batch "
                f"{d['norm_batch']} ({how})")

    # -- collectives ---------------------------------------------------------------------------
    def sum_(self, *tensors: torch.Tensor) -> None:
        """All-reduce (sum) in place."""
        if self.env.enabled:
            for t in tensors:
                tdist.all_reduce(t, op=tdist.ReduceOp.SUM)

    def max_(self, t: torch.Tensor) -> None:
        if self.env.enabled:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)

    def from_main(self, obj: Any) -> Any:
        """rank 0's `obj` on every process (pickled; for small control data and resume state)."""
        if not self.env.enabled:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None

    def average_buffers(self, model: nn.Module) -> None:
        """Replace every floating-point buffer (running statistics) by its mean over the
        processes, in one all-reduce per dtype. Integer buffers (num_batches_tracked) are equal
        on every process already."""
        if not self.env.enabled or self.env.world_size == 1:
            return
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in model.buffers():
            if b.is_floating_point():
                groups.setdefault(b.dtype, []).append(b)
        for bufs in groups.values():
            flat = torch.cat([b.reshape(-1) for b in bufs])
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
            flat /= self.env.world_size
            offset = 0
            for b in bufs:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()

    def barrier(self) -> None:
        if self.env.enabled:
            tdist.barrier()

    # -- model and data ------------------------------------------------------------------------
    def wrap(self, model: nn.Module, sync_bn: bool) -> nn.Module:
        """The module to train with: `model` itself, or a DDP wrapper sharing its parameters.

        Checkpoints keep using `model`, so their keys have no 'module.' prefix and a run
        trained with DDP loads into a single-process model and vice versa.
        """
        if not self.env.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # buffers are averaged after each step (average_buffers) instead of copied from rank 0
        return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                   broadcast_buffers=False)

    def check_batch(self, batch_size: int) -> None:
        check_batch(batch_size, self.env.world_size)

    def train_loader(self, loader, bundle: DataBundle, batch_size: int, seed: int,
                     workers: int, memory_format):
        if not self.env.enabled:
            return loader
        if isinstance(bundle.train, Split):
            return ShardedBatches(loader, self.env.rank, self.env.world_size)
        return DistributedStream(bundle.train, self.per_device_batch(batch_size), self.device,
                                 workers, seed, memory_format, self.env)

    def eval_bundle(self, bundle: DataBundle) -> DataBundle:
        """The bundle with this process's contiguous 1/N of the test set (and of the
        validation set)."""
        if not self.env.enabled:
            return bundle
        world, rank = self.env.world_size, self.env.rank

        def part(split):
            n = len(split)
            index = torch.arange(n * rank // world, n * (rank + 1) // world)
            if isinstance(split, Split):
                return split.subset(index)
            return torch.utils.data.Subset(split, index.tolist())

        val = None if bundle.val is None else part(bundle.val)
        return dataclasses.replace(bundle, test=part(bundle.test), val=val)


def check_sync_bn(device: torch.device) -> None:
    if device.type != "cuda":
        raise UserError(f"sync_bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation), "
                        f"but this run is on {device.type!r}; drop --sync-bn on the CPU")


def check_probes(probe_every: int, world_size: int) -> None:
    """Probes are refused on more than one process: the prober's extra forward passes would run
    on rank 0 alone (a SyncBatchNorm there waits for the other ranks forever), and its
    gradients would be one shard's while the update uses the all-reduced ones."""
    if probe_every and world_size > 1:
        raise UserError(f"probe_every {probe_every} needs a single process, got {world_size} "
                        "processes; set probe_every 0 or train without --nproc/torchrun")


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers -> SyncBatchNorm (statistics over the global batch); GPU only."""
    check_sync_bn(device)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


class ShardedBatches:
    """Process r's slice [r*b, (r+1)*b) of every global batch of a MemoryLoader (b = B / N)."""

    def __init__(self, loader, rank: int, world: int):
        self.loader, self.rank, self.world = loader, rank, world

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader.epoch(epoch):
            b = len(y) // self.world
            lo = self.rank * b
            yield x[lo:lo + b], y[lo:lo + b]


class DistributedStream:
    """Streamed training data: a DistributedSampler seeded by (seed, epoch), workers + pinning."""

    def __init__(self, dataset, batch_size: int, device: torch.device, workers: int, seed: int,
                 memory_format, env: DistEnv):
        self.dataset, self.batch_size, self.device = dataset, batch_size, device
        self.workers, self.seed, self.memory_format, self.env = workers, seed, memory_format, env

    def _sampler(self, epoch: int):
        s = DistributedSampler(self.dataset, num_replicas=self.env.world_size,
                               rank=self.env.rank, shuffle=True, seed=self.seed, drop_last=True)
        s.set_epoch(epoch)
        return s

    def __len__(self) -> int:
        return max(1, len(self.dataset) // self.env.world_size // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The generator only seeds the workers' augmentation; the rank enters it so that the
        # processes draw different crops.
        g = epoch_generator(self.seed * 1009 + self.env.rank, epoch)
        dl = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self._sampler(epoch),
            drop_last=True, num_workers=self.workers, generator=g,
            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for x, y in dl:
            x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield x, y.to(self.device, non_blocking=True)


def device_for(device: torch.device, env: DistEnv) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK."""
    if device.type == "cuda" and env.enabled:
        if env.local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {env.local_rank} has no GPU: this node has "
                            f"{torch.cuda.device_count()}; start at most that many processes "
                            "per node")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return device


@contextlib.contextmanager
def session(device: torch.device, env: DistEnv | None = None) -> Iterator[Context]:
    """A Context for one run; joins (and afterwards leaves) the process group when needed."""
    env = detect() if env is None else env
    device = device_for(device, env)
    started = False
    if env.enabled and not tdist.is_initialized():
        tdist.init_process_group(backend=backend_for(device))
        started = True
    try:
        yield Context(env, device)
    finally:
        if started:
            tdist.destroy_process_group()


def check_batch(batch_size: int, n: int) -> None:
    if batch_size % n:
        raise UserError(f"batch_size {batch_size} is not divisible by the {n} processes; "
                        f"the global batch is split evenly (use a multiple of {n})")


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """`bnlab train --nproc N ...` -> torchrun with N local processes running `bnlab train ...`."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "bnlab", "train", *argv]


def launch(nproc: int, argv: list[str], cfg=None) -> int:
    """Run `bnlab train argv` under torchrun on this node and return its exit code. `cfg` (the
    parsed RunConfig) lets a mistake be reported once here instead of by every process."""
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if detect().launched:
        raise UserError("--nproc starts torchrun itself; inside torchrun leave it out")
    if cfg is not None and cfg.sync_bn and (cfg.device == "cpu" or not torch.cuda.is_available()):
        check_sync_bn(torch.device("cpu"))
    if cfg is not None:
        check_probes(cfg.probe_every, nproc)
        check_batch(cfg.batch_size, nproc)
        # the data once here: a missing or damaged dataset is one line, not one error per
        # process followed by torchrun's own report
        fingerprint(cfg.dataset, cfg.data_dir or None, cfg.download)
    return subprocess.run(launch_command(nproc, argv)).returncode

