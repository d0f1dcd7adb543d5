"""One run, trained: `train_run(cfg, out)`.

loop.py         the training loop of one run (`train_run`, `train_one_epoch`)
record.py       the run folder as a loop keeps it: begin, epochs, checkpoint, finish, failure
optim.py        parameter groups, SGD, the learning-rate schedule, SGD over a pack of runs
evaluate.py     evaluation in eval mode, and the accuracy of guessing
packing.py      what trains together as a pack (read without torch: estimates use it)
packed.py       K runs trained at once as one grouped network (`train_packed`)
distributed.py  data-parallel training under torchrun
probes.py       what happens inside the network, sampled during training
probe_stats.py  the probes' activation statistics: pooled and per-unit percentiles

`train_run` is imported from loop.py when first used, so that bnlab.train.packing is read
without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bnlab.train.loop import train_run

__all__ = ["train_run"]


def __getattr__(name: str):
    if name == "train_run":
        return importlib.import_module("bnlab.train.loop").train_run
    raise AttributeError(f"module 'bnlab.train' has no attribute {name!r}")
