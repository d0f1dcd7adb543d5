"""The fast path of a training step: memory layout, optional torch.compile, and a divergence
check that never stalls the GPU.

Why each piece exists:
- channels_last: oneDNN (CPU) and cuDNN (GPU) run 3x3 convolutions of small-channel ResNets
  fastest in NHWC; on this project's reference CPU it also keeps bf16 convolutions on their fast
  kernels (docs/speed.md has the measurements).
- torch.compile fuses the BN/ReLU/residual element-wise work that dominates a CIFAR ResNet step
  once the convolutions are fast. On the CPU, bnlab's own fused kernels (bnlab.fast.cpu_kernels) do
  that work in eager mode in fewer passes than inductor's, so eager is the faster CPU path.
  On a GPU the launch cost of each kernel, most of the step
  time of a ResNet-20 at batch 128, is removed by capturing the whole step in one CUDA graph
  (bnlab.fast.step_graph); with that off, by torch.compile's own CUDA graphs around the model (mode
  "reduce-overhead").
  Shapes are kept static (the training loader drops the last partial batch and evaluation pads
  its last batch), so each of train and eval compiles exactly once.
- On the CPU, glibc's malloc hands every block of more than 128 KiB (a few MB for
  activations of a CIFAR batch) back to the kernel when freed and maps fresh, zeroed pages
  for the next step: page faults on every step. `tune_cpu_allocator` keeps such blocks in the
  heap for reuse (5-10% of a ResNet-20 step on the reference CPU, docs/speed.md).
- A loss check by `.item()` every step would wait for the GPU each step; `FirstBad` keeps the
  first non-finite step on the device and reads it through an event-guarded copy instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
from torch import nn

# torch.compile mode per device type: CUDA graphs on GPUs, plain inductor elsewhere
COMPILE_MODES = {"cuda": "reduce-overhead", "cpu": "default"}
DIVERGENCE_CHECK_EVERY = {"cpu": 1, "cuda": 50}  # steps between looks at the loss flag


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap and are reused (glibc's max)
TRIM_THRESHOLD = 256 << 20  # free heap memory kept before it is returned to the system
_allocator_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Serve blocks below 32 MiB from malloc's heap and keep up to 256 MiB of freed memory
    there, so the tensors of each training step reuse the previous step's pages instead of
    faulting in fresh ones. Process-wide and idempotent; True when it took effect (glibc
    only, else nothing is changed)."""
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if not hasattr(libc, "gnu_get_libc_version"):  # glibc's mallopt only
                    return False
                _allocator_tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                                        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            except (OSError, AttributeError):
                pass
    return _allocator_tuned


def memory_format_for(device: torch.device, model_name: str) -> torch.memory_format:
    """channels_last for convolutional models on every device, contiguous for the MLP."""
    if model_name.startswith("mlp"):
        return torch.contiguous_format
    return torch.channels_last


def compile_model(model: nn.Module, device: torch.device, mode: str | None = None):
    """`torch.compile(model)` with static shapes; the returned module shares `model`'s
    parameters and buffers, so state dicts and checkpoints are taken from `model` as before."""
    mode = mode or COMPILE_MODES.get(device.type, "default")
    return torch.compile(model, mode=mode, dynamic=False)


def uses_cuda_graphs(model) -> bool:
    return getattr(model, "_bnlab_cuda_graphs", False)


def mark_step(model) -> None:
    """Tell CUDA graph trees that a new training iteration starts (outputs of the previous
    one may then be overwritten)."""
    if uses_cuda_graphs(model):
        torch.compiler.cudagraph_mark_step_begin()


# the same modes without torch.compile's own CUDA graphs, for a step captured whole
# (bnlab.fast.step_graph): a capture cannot contain another
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def prepare(model: nn.Module, device: torch.device, compile: bool, mode: str | None = None,
            whole_step_graph: bool = False):
    """The callable used for forward passes: `model` itself, or its compiled wrapper.
    whole_step_graph: the caller captures the whole step in one CUDA graph, so the compiled
    model must not use CUDA graphs of its own."""
    if not compile:
        return model
    mode = mode or COMPILE_MODES.get(device.type, "default")
    if whole_step_graph:
        mode = WITHOUT_CUDA_GRAPHS.get(mode, mode)
    fast = compile_model(model, device, mode)
    fast._bnlab_cuda_graphs = device.type == "cuda" and mode == "reduce-overhead"
    return fast


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the batch dimension of `x` to `size` rows. In eval mode every layer of a bnlab
    model acts on each sample alone, so the real rows' outputs do not change; a compiled model
    then sees one batch shape only."""
    n = x.shape[0]
    if n >= size:
        return x
    fill = x.new_zeros((size - n, *x.shape[1:]))
    fmt = torch.channels_last if (x.ndim == 4 and x.is_contiguous(
        memory_format=torch.channels_last) and not x.is_contiguous()) else None
    out = torch.cat([x, fill])
    return out.contiguous(memory_format=fmt) if fmt is not None else out


class FirstBad:
    """Index of the first training step whose loss was not finite, kept on the device.

    `update` costs one device copy and no synchronization: the losses of the last `every`
    steps are kept in a small device buffer and checked together (a handful of kernels) when
    the flag is read. `poll` returns the step once it is known: on the CPU at once; on a GPU
    (or with lazy=True) from a copy issued `every` steps earlier whose event has completed (so
    the answer may come up to 2*every steps late, never with a stall), and exactly at the end
    of an epoch (`final=True`), where the metrics are read anyway.
    """

    def __init__(self, device: torch.device, shape: tuple[int, ...] = (),
                 lazy: bool | None = None, every: int | None = None):
        self.device = device
        self.lazy = device.type == "cuda" if lazy is None else lazy
        self.every = every or DIVERGENCE_CHECK_EVERY.get(device.type, 50)
        self.reset(tuple(shape))

    @property
    def flag(self) -> torch.Tensor:
        """The first bad step per run (-1: none yet), with every recorded loss checked."""
        self._fold()
        return self._flag

    def update(self, loss: torch.Tensor, step: int) -> None:
        if self._n and (step != self._first + self._n or self._n == len(self._rows)):
            self._fold()
        if self._n == 0:
            self._first = step
        self._rows[self._n].copy_(loss.detach())
        self._n += 1

    def _fold(self) -> None:
        """Merge the buffered losses into the flag (steps _first, _first + 1, ...)."""
        if self._n == 0:
            return
        rows = self._rows[:self._n]
        at = torch.arange(self._n, device=self.device).view(-1, *[1] * (rows.ndim - 1))
        first = torch.where(torch.isfinite(rows), self._n, at).amin(0)
        new = torch.where(first < self._n, first + self._first, -1)
        self._flag = torch.where(self._flag < 0, new, self._flag)
        self._n = 0

    def poll(self, i: int, final: bool = False) -> torch.Tensor | None:
        """The flag's value (a CPU tensor) when it shows a bad step, else None."""
        if final or not self.lazy:
            if not final and (i + 1) % self.every:
                return None
            v = self.flag.cpu()
            self._pending = None
            return v if bool((v >= 0).any()) else None
        if (i + 1) % self.every:
            return None
        if self._pending is not None:
            host, event = self._pending
            if event is not None and not event.query():
                return None
            self._pending = None
            if bool((host >= 0).any()):
                return host.clone()
        self._pending = self._copy_to_host()
        return None

    def _copy_to_host(self):
        if self.device.type != "cuda":
            return self.flag.cpu(), None
        host = torch.empty(self.flag.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(self.flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def reset(self, shape: tuple[int, ...] | None = None) -> None:
        shape = self._flag.shape if shape is None else shape
        self._flag = torch.full(shape, -1, dtype=torch.int64, device=self.device)
        self._rows = torch.empty((self.every, *shape), dtype=torch.float64, device=self.device)
        self._n, self._first = 0, 0
        self._pending = None
