"""A whole training step (forward, loss, backward, optimizer update) replayed as one CUDA graph.

Why: a ResNet-20 step at batch 128 is several hundred small kernels. Launched one by one from
Python they take longer on the host than on an H100/H200, so the GPU waits (docs/speed.md:
every GPU variant measured CPU time equal to wall time). Captured once, a step costs one graph
launch plus the copies of the batch into the graph's input tensors.

`StepGraph(fn)` wraps a step function. Its first `warmup` calls run `fn` as ordinary steps on a
side stream (the lazy set-up of cuDNN, cuBLAS, autograd and torch.compile must not happen
during a capture); the next call captures `fn` once and replays it, and every later call copies
its inputs into the captured ones and replays. Every call, warm-up included, is a real training
step on the real batch: a graphed run follows the trajectory of the same loop run without the
graph (the same kernels in the same order; tests/test_step_graph.py and
benchmarks/graph_check.py compare the two on a GPU).

What `fn` must respect (the training loops in bnlab/train/loop.py and packed.py do):
- tensors in, tensors out, the same shapes every call; anything that changes between steps
  (the learning rate) is an input tensor, never a Python number baked into a kernel;
- no host synchronization (.item(), .cpu(), data-dependent Python branches);
- gradients set to None at its start, so the captured backward writes fresh gradients instead
  of accumulating into tensors from before the capture;
- autocast with cache_enabled=False (autocast's weight cache does not survive a capture).

Should the capture fail (an operation that cannot be captured), the error is reported once
through `log` and the step keeps running uncaptured: nothing has been executed by the failed
capture, so no step is lost or repeated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_STEPS = 3  # ordinary steps before the capture (the PyTorch docs' whole-network example)


def supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


class StepGraph:
    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], device: torch.device,
                 warmup: int = WARMUP_STEPS, log: Callable[[str], None] | None = None):
        if not supported(device):
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.fn, self.device, self.warmup, self.log = fn, device, warmup, log
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.stream = torch.cuda.Stream(device)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One training step on `inputs`; the returned tensors are valid until the next call
        (read or copy them before it: they are the graph's own outputs)."""
        self.calls += 1
        if self.graph is not None:
            for static, new in zip(self.inputs, inputs):
                static.copy_(new)
            self.graph.replay()
            return self.outputs
        if self.failed:
            return self.fn(*inputs)
        if self.calls <= self.warmup:
            return self._on_side_stream(inputs)
        return self._capture(inputs)

    def _on_side_stream(self, inputs) -> tuple[torch.Tensor, ...]:
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            out = self.fn(*inputs)
        main.wait_stream(self.stream)
        return out

    def _capture(self, inputs) -> tuple[torch.Tensor, ...]:
        torch.cuda.synchronize(self.device)
        static = tuple(t.clone(memory_format=torch.preserve_format) for t in inputs)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a DataLoader's pin-memory thread may keep working meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.fn(*static)
        except Exception as e:  # noqa: BLE001 - reported, then the step runs uncaptured
            self.failed = True
            if self.log is not None:
                self.log(f"CUDA graph capture of the training step failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "training goes on without it")
            torch.cuda.synchronize(self.device)
            return self.fn(*inputs)
        self.graph, self.inputs, self.outputs = graph, static, tuple(outputs)
        graph.replay()  # the capture recorded this step without running it
        return self.outputs
