"""`--jobs auto`: how many runs of a study train at once on this machine, and with how many
torch threads each. Without torch, so that `bnlab study list` estimates a study the way
`bnlab study run` will train it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from bnlab import machine
from bnlab.models.names import PACKABLE_MODELS
from bnlab.study.estimate import images

RUN_GIB = 2.0  # memory a small-network CPU run may hold (a decoded CIFAR-10 and its model: ~1.2)
PARALLEL_MIN_IMAGES = 10_000  # training-image equivalents of a run worth a worker's start-up


def _on_cpu(device: str) -> bool:
    from bnlab.runtime import on_cpu  # torch: only where a device must be resolved

    return on_cpu(device)


def auto_jobs(runs, todo, sizes: dict | None = None,
              on_cpu: Callable[[str], bool] | None = None) -> tuple[int, int | None, str]:
    """(runs trained at once, torch threads per run or None for all cores, why).

    On a CPU, bnlab's small networks (names.PACKABLE_MODELS: the CIFAR ResNets, plain nets,
    VGGs and the MLP) train faster as one single-threaded process per core than as one run
    spread over the cores: a ResNet-20 step at batch 64 keeps 2 threads busy only part of the
    time (on a 2-core Xeon, two runs of `quick` took 71 s at once, 97 s one after the other).
    So a study of such CPU runs, each worth a worker's start-up (PARALLEL_MIN_IMAGES training
    images or more, as the estimator counts them), trains one single-threaded run per core, at
    most one per run left and one per RUN_GIB of available memory. The thread count depends on
    the study's runs only (`runs`: all of them), never on how many are left (`todo`), so a run
    resumed alone computes as it did beside others. Anything else trains one run at a time on
    all cores. `on_cpu(device)` says whether a run's device is this CPU (default: resolved
    with torch, bnlab.runtime.on_cpu)."""
    runs, todo = list(runs), list(todo)
    on_cpu = on_cpu or _on_cpu
    cores = machine.usable_cores()
    if cores < 2 or len(runs) < 2:
        return 1, None, "one core" if cores < 2 else "one run"
    if not all(on_cpu(r.cfg.device) for r in runs):
        return 1, None, "runs on a GPU"
    if any(r.cfg.model not in PACKABLE_MODELS for r in runs):
        return 1, None, "a large network"
    # the spec's dataset name (a --data-map'ed run reads a path), whose size the estimator knows
    small = [r for r in runs if (images(dataclasses.replace(
        r.cfg, dataset=getattr(r, "dataset", r.cfg.dataset)), sizes or {}) or 0)
        < PARALLEL_MIN_IMAGES]
    if small:
        return 1, None, "runs too short to start workers for"
    n = min(cores, max(1, len(todo)))
    gib = machine.available_gib()
    if gib is not None:
        n = min(n, max(1, int(gib // RUN_GIB)))
    return n, 1, f"one single-threaded run per core, {cores} cores"
