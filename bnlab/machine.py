"""What bnlab reads of the machine it runs on, without torch (the command line reads it before
torch loads, to choose OpenMP's wait policy): the cores this process may use, whether other work
keeps them busy, the memory available, and an identity of the CPU for what is measured on it.

"Busy" means other work on half the usable cores. The command line's OpenMP choice reads it
from the 1-minute load average (no waiting, before torch loads); read it before the caller's
own work starts, whose threads the load average would count too. The calibration's decision
to keep a measurement reads the CPUs' busy time over a quarter of a second instead
(quiet_for_measuring): the load average would still count the decoding and compiling that
a study's first start does just before it measures.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
MEMINFO = Path("/proc/meminfo")
PROC_STAT = Path("/proc/stat")
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP = Path("/sys/fs/cgroup")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a batch system's cpuset),
    or all of the machine's where the platform has no affinity (macOS); fewer where its
    cgroup's CPU quota allows fewer (`docker run --cpus 2` on a 64-core machine: 2), rounded
    down, at least 1."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    return cores if quota is None else max(1, min(cores, int(quota)))


def cpu_quota() -> float | None:
    """The CPUs' worth of time this process's cgroup may use (quota over period), or None
    without a limit or where none can be read: cgroup v2's cpu.max of the process's cgroup and
    of each cgroup above it (the smallest counts), else cgroup v1's cpu.cfs_quota_us over
    cpu.cfs_period_us."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip().lstrip("/")
        if controllers == "":  # v2: one hierarchy
            d = CGROUP / rel
            while True:
                quotas.append(_v2_quota(d / "cpu.max"))
                if d == CGROUP or CGROUP not in d.parents:
                    break
                d = d.parent
        elif "cpu" in controllers.split(","):
            for base in (CGROUP / controllers, CGROUP / "cpu", CGROUP / "cpu,cpuacct"):
                found = [_v1_quota(d) for d in (base / rel, base) if d.is_dir()]
                if found:
                    quotas.append(found[0])
                    break
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _v2_quota(path: Path) -> float | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


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


def cpu_busy_now(window: float = 0.25) -> bool | None:
    """Whether other work keeps half the usable cores busy now: the busy time of the CPUs this
    process may use, from /proc/stat read twice `window` seconds apart (None where it cannot be
    read). The caller must be idle meanwhile. Unlike the 1-minute load average it does not
    count work that ended a moment ago (a dataset decoded just before a measurement)."""
    import time

    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except AttributeError:
        cpus = None
    first = _cpu_times(cpus)
    if first is None:
        return None
    time.sleep(window)
    second = _cpu_times(cpus)
    if second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])  # of the counted CPUs' time
    counted = len(cpus) if cpus else (os.cpu_count() or 1)
    return share * counted >= usable_cores() / 2


def _cpu_times(cpus: set[str] | None) -> tuple[int, int] | None:
    """(busy, total) jiffies of /proc/stat's `cpus` lines (all of them when None)."""
    busy = total = 0
    try:
        for line in PROC_STAT.read_text().splitlines():
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu" or (cpus and name not in cpus):
                continue
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            total += sum(values)
            busy += sum(values) - values[3] - values[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def quiet_for_measuring() -> bool:
    """Whether a speed measured now may be kept as this machine's: no other work on half the
    usable cores now (cpu_busy_now), or, where that cannot be read, by the load average
    (cpu_busy)."""
    busy = cpu_busy_now()
    return not (cpu_busy() if busy is None else busy)


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
