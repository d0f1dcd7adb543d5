"""What bnlab reads of the machine it runs on, without torch (the command line reads it before
torch loads, to choose OpenMP's wait policy): the cores this process may use, whether other work
keeps them busy, the memory available, and an identity of the CPU for what is measured on it.

One rule for "busy" serves every caller (the command line's OpenMP choice, the calibration's
decision to keep its measurement): the 1-minute load average reaches half the usable cores.
Read it before the caller's own work starts, whose threads the load average would count too.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
MEMINFO = Path("/proc/meminfo")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a batch system's cpuset),
    or all of the machine's where the platform has no affinity (macOS)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, averaged), or None where there is none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_busy() -> bool:
    """Whether other work keeps the CPU busy: a 1-minute load average of at least half the
    usable cores (False where the load is unknown). A run then shares its cores: idle OpenMP
    threads should sleep rather than spin, and a speed measured now says little of later."""
    load = load_average()
    return load is not None and load >= usable_cores() / 2


def available_gib() -> float | None:
    """MemAvailable of /proc/meminfo in GiB (None where there is none)."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def identity() -> str:
    """The CPU's model name and flags and the cores this process may use, hashed (16 hex
    digits): the same on every process of this machine and setting, another on a machine whose
    measured speed would differ."""
    try:
        lines = CPUINFO.read_text().splitlines()
        info = "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        info = platform.processor() or platform.machine()
    return hashlib.sha256(f"{info}\n{usable_cores()}".encode()).hexdigest()[:16]
