"""This machine's CPU speed against the CPU bnlab's table of rates was measured on.

CPUs differ by 2x and more on the same network (docs/results.md: a 2-core Xeon and a 2-core EPYC
of the same size), so the table's rates alone can be that far off on another machine. Before
a CPU study starts, `speed(precision, batch, threads)` times a few training steps of ResNet-20
with BN on random images of CIFAR's shape, in the study's precision, batch and threads per run,
and returns the measured rate over the rate the table gives for the same step
(estimate.LONE's CIFAR ResNet rate with estimate.cpu_cost): the factor the estimate divides its
CPU times by. It takes about two seconds, once per machine, torch version and setting: the
result is kept in the bnlab cache (calibration.json), keyed by the CPU's model and flags, the
cores (bnlab.machine.identity) and the torch version, unless other work kept the machine busy
when it was measured (bnlab.machine.quiet_for_measuring, read just before: then this process
uses it and the next one measures again; delete the file to measure again).
`cached_speed(precision, batch, threads)` reads one without torch (`bnlab study list`).

precision "auto" (bnlab.config) is resolved here: `choose_precision(device, batch, threads)`
gives bf16 on a GPU that supports it, and on a CPU bf16 where the same measurement trains
ResNet-20 at least BF16_MARGIN times as fast in bf16 as in fp32, else fp32 (on one 2-core Xeon
with AVX512-BF16 bf16 was 1.2-1.5x slower, on a 2-core EPYC 1.7x faster: docs/results.md); a
run's config then records the precision it trained in. The measured
factor scales only the families whose table rates rest on ResNet-20's (estimate.SPEED_FAMILIES:
the CIFAR ResNets, plain nets and VGGs). The others keep the table's rate: the table holds no
reference rate of their own step to measure this CPU against.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bnlab import machine
from bnlab.config import RunConfig, cache_root
from bnlab.study.estimate import LONE, cpu_cost

FILE = "calibration.json"
WARMUP_STEPS = 2
MIN_SECONDS = 1.5  # timed steps: at least this long ...
MAX_STEPS = 12  # ... and at most this many steps after the warm-up
BF16_MARGIN = 1.1  # precision "auto": bf16 only where it trains this many times as fast
GIVE_UP = 8  # measure(slower_than=...): a step this many times too slow ends the measurement
_UNKEPT: dict[tuple[str, str], dict] = {}  # (cache file, key): measured busy, not kept


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def table_rate(precision: str, batch: int) -> float:
    """The table's training images per second of ResNet-20 with BN at this precision."""
    cfg = RunConfig(model="resnet20", precision=precision, batch_size=batch)
    return LONE[("cifar-resnet", "cpu")].images_per_s / cpu_cost(cfg, "cifar-resnet")


def measure(precision: str, batch: int, threads: int, slower_than: float | None = None) -> float:
    """Training images per second of ResNet-20 with BN (fused CPU kernels, channels_last, as a
    run trains) on random images, with `threads` torch threads.

    slower_than (images/s): stop early, after any step, warm-up included, that took GIVE_UP
    times as long as a step at that rate, and return that step's rate: only a rate far below
    it, not its exact value, then matters (bf16 on a CPU without bf16 instructions: a step of
    ResNet-20 took 5 s there against 0.27 s in fp32)."""
    import torch
    import torch.nn.functional as F

    from bnlab.models import build_model
    from bnlab.runtime import autocast

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        model = build_model("resnet20", 10, cpu_kernels=True).to(
            memory_format=torch.channels_last)
        params = list(model.parameters())
        x = torch.randn(batch, 3, 32, 32, generator=g).contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), generator=g)
        device = torch.device("cpu")

        def step() -> None:
            with autocast(device, precision):
                loss = F.cross_entropy(model(x), y)
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():  # plain SGD: torch.optim would load torch._dynamo (seconds)
                torch._foreach_add_(params, [p.grad for p in params], alpha=-0.01)
            loss.item()

        limit = GIVE_UP * batch / slower_than if slower_than else float("inf")

        def timed_step() -> float:
            t = time.perf_counter()
            step()
            return time.perf_counter() - t

        for _ in range(WARMUP_STEPS):
            if (took := timed_step()) > limit:
                return batch / took
        steps, t0 = 0, time.perf_counter()
        while steps < MAX_STEPS and (steps < 2 or time.perf_counter() - t0 < MIN_SECONDS):
            if (took := timed_step()) > limit:
                return batch / took
            steps += 1
        return steps * batch / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def speed(precision: str, batch: int, threads: int, log=None) -> float:
    """This machine's speed over the table's, for runs of this precision, batch and threads
    (measured once, then read from the cache)."""
    return float(_entry(precision, batch, threads, log)["factor"])


def _entry(precision: str, batch: int, threads: int, log=None,
           slower_than: float | None = None) -> dict:
    import torch

    path = cache_root() / FILE
    key = (f"{machine.identity()}|torch {torch.__version__}|{precision}|batch {batch}|"
           f"{threads} threads")
    entry = _read(path).get(key) or _UNKEPT.get((str(path), key))
    if not (isinstance(entry, dict) and isinstance(entry.get("factor"), int | float)
            and entry["factor"] > 0):
        # read before measuring, which would count its own threads
        busy = not machine.quiet_for_measuring()
        rate = measure(precision, batch, threads, slower_than)
        entry = {"factor": rate / table_rate(precision, batch), "images_per_s": rate,
                 "measured": time.time()}
        if busy:  # a busy machine's speed is used by this process, not kept
            _UNKEPT[(str(path), key)] = entry
        else:
            data = _read(path)
            data[key] = entry
            tmp = path.with_name(f"{FILE}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(data, indent=1))
                os.replace(tmp, path)
            except OSError:  # a read-only cache: measured again next time
                tmp.unlink(missing_ok=True)
        if log:
            log(f"this CPU: ResNet-20 trains {rate:.0f} images/s ({precision}, batch {batch}, "
                f"{threads} thread{'s' if threads > 1 else ''} a run), "
                f"{entry['factor']:.2f} x the rate of bnlab's table")
    return entry


def choose_precision(device: str, batch: int, threads: int, log=None) -> tuple[str, str]:
    """(fp32 or bf16, why) for precision "auto" on `device` ("cpu" or "cuda"): on CUDA bf16
    where the GPU supports it; on a CPU by ResNet-20's measured training rate in both at this
    batch and threads per run (module docstring)."""
    import torch

    if device == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ("bf16", "this GPU supports bf16") if ok else \
            ("fp32", "this GPU does not support bf16")
    rates = {"fp32": float(_entry("fp32", batch, threads, log)["images_per_s"])}
    # bf16 only needs measuring to tell whether it reaches the margin: where it is emulated, a
    # few steps would take half a minute
    rates["bf16"] = float(_entry("bf16", batch, threads, log,
                                 slower_than=BF16_MARGIN * rates["fp32"])["images_per_s"])
    return _pick(rates, batch, threads)


def cached_precision(batch: int, threads: int) -> str | None:
    """choose_precision on a CPU from the cache alone (no torch), or None where this machine
    has not measured both precisions at these threads."""
    rates = {}
    for p in ("fp32", "bf16"):
        e = _cached(p, batch, threads)
        if e is None or not isinstance(e.get("images_per_s"), int | float):
            return None
        rates[p] = float(e["images_per_s"])
    return _pick(rates, batch, threads)[0]


def _pick(rates: dict[str, float], batch: int, threads: int) -> tuple[str, str]:
    choice = "bf16" if rates["bf16"] >= BF16_MARGIN * rates["fp32"] else "fp32"
    return choice, (f"ResNet-20 trains {rates['bf16']:.0f} images/s in bf16 and "
                    f"{rates['fp32']:.0f} in fp32 on this CPU (batch {batch}, {threads} "
                    f"thread{'s' if threads > 1 else ''} a run)")


def cached_speed(precision: str, batch: int, threads: int) -> float | None:
    """The factor measured on this machine for runs of this precision and threads per run, at
    this batch or else the nearest one measured (a training image costs about the same at
    batch 64 and 128: docs/results.md), or None: without torch. A factor of another precision
    or thread count is not used: on a 2-core Xeon they ranged from 0.11 to 0.47."""
    e = _cached(precision, batch, threads)
    return None if e is None else e["factor"]


def _cached(precision: str, batch: int, threads: int) -> dict | None:
    prefix = f"{machine.identity()}|torch "
    near = []
    for key, e in _read(cache_root() / FILE).items():
        parts = key.split("|")
        if not key.startswith(prefix) or len(parts) != 5 or not isinstance(e, dict) \
                or not isinstance(e.get("factor"), int | float) or e["factor"] <= 0:
            continue
        if parts[2] != precision or parts[4] != f"{threads} threads":
            continue
        try:
            b = int(parts[3].removeprefix("batch "))
        except ValueError:
            continue
        near.append((abs(b - batch), -e.get("measured", 0), len(near), e))
    return min(near)[3] if near else None
