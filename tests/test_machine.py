"""The machine's facts (bnlab.machine): usable cores, the one "CPU busy" rule, available memory
and the CPU's identity, each read from a faked source whose answer is known."""

from __future__ import annotations

import hashlib
import os

import pytest

from bnlab import machine


@pytest.fixture
def cores(monkeypatch):
    """Give this process the cores `set_cores(n)` names (its CPU affinity)."""
    def set_cores(n: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    return set_cores


def test_usable_cores_are_the_affinity_else_the_machine_s(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert machine.usable_cores() == 3  # taskset -c 0,2,5 on a 64-core machine
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS has no affinity
    assert machine.usable_cores() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert machine.usable_cores() == 1


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    """A fake /proc/self/cgroup and /sys/fs/cgroup: write(membership, {path: {file: text}})."""
    root, proc = tmp_path / "cgroup", tmp_path / "self-cgroup"
    monkeypatch.setattr(machine, "CGROUP", root)
    monkeypatch.setattr(machine, "PROC_CGROUP", proc)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)

    def write(membership: str, files: dict[str, dict[str, str]]) -> None:
        proc.write_text(membership)
        for folder, contents in files.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            for name, text in contents.items():
                (root / folder / name).write_text(text)
    return write


def test_a_cgroup_v2_quota_limits_the_usable_cores(cgroup):
    cgroup("0::/job/step\n", {"": {"cpu.max": "max 100000\n"},
                              "job": {"cpu.max": "250000 100000\n"},
                              "job/step": {"cpu.max": "max 100000\n"}})
    assert machine.cpu_quota() == 2.5  # the job's limit holds for its step
    assert machine.usable_cores() == 2  # rounded down
    cgroup("0::/job/step\n", {"job": {"cpu.max": "50000 100000\n"}})
    assert machine.usable_cores() == 1  # half a CPU: at least 1
    cgroup("0::/\n", {"": {"cpu.max": "max 100000\n"}, "job": {"cpu.max": "max 100000\n"}})
    assert machine.cpu_quota() is None and machine.usable_cores() == 64


def test_a_cgroup_v1_quota_limits_the_usable_cores(cgroup):
    cgroup("4:memory:/a\n3:cpu,cpuacct:/docker/abc\n",
           {"cpu,cpuacct/docker/abc": {"cpu.cfs_quota_us": "300000\n",
                                       "cpu.cfs_period_us": "100000\n"}})
    assert machine.cpu_quota() == 3.0 and machine.usable_cores() == 3
    cgroup("1:cpu:/\n", {"cpu": {"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"}})
    assert machine.cpu_quota() is None and machine.usable_cores() == 64


def test_no_cgroup_file_means_no_quota(cgroup):
    assert machine.cpu_quota() is None and machine.usable_cores() == 64


@pytest.mark.parametrize("n, load, busy", [
    (2, 0.99, False), (2, 1.0, True),  # half of 2 cores
    (4, 1.99, False), (4, 2.0, True), (4, 7.5, True),
    (1, 0.49, False), (1, 0.5, True),
])
def test_busy_from_half_the_usable_cores(cores, monkeypatch, n, load, busy):
    cores(n)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 99.0))  # the 1-minute one counts
    assert machine.load_average() == load
    assert machine.cpu_busy() is busy


def test_an_unknown_load_is_not_busy(cores, monkeypatch):
    cores(2)

    def unreadable():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unreadable)
    assert machine.load_average() is None and machine.cpu_busy() is False
    monkeypatch.delattr(os, "getloadavg")
    assert machine.load_average() is None and machine.cpu_busy() is False


def test_busy_now_from_the_usable_cpus_busy_time(tmp_path, monkeypatch):
    """/proc/stat's lines of the CPUs this process may use, read twice: busy = all but idle
    and iowait; other CPUs' lines and the total line are not counted."""
    stat = tmp_path / "stat"
    monkeypatch.setattr(machine, "PROC_STAT", stat)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2}, raising=False)
    #            user nice system idle iowait irq softirq steal
    start = {0: (100, 0, 50, 1000, 10, 0, 0, 0), 1: (0, 0, 0, 0, 0, 0, 0, 0),
             2: (200, 0, 0, 500, 0, 0, 0, 0)}

    def write(added: dict[int, tuple]) -> None:
        rows = ["cpu  999999 0 0 0 0 0 0 0 0 0"]
        for c, base in start.items():
            add = added.get(c, (0,) * 8)
            rows.append(f"cpu{c} " + " ".join(str(a + b) for a, b in zip(base, add)) + " 0 0")
        stat.write_text("\n".join(rows + ["intr 12345", "ctxt 678"]) + "\n")

    def run(added: dict[int, tuple]) -> bool | None:
        write({})
        monkeypatch.setattr("time.sleep", lambda s: write(added))
        return machine.cpu_busy_now()

    # cpu0 fully busy (90 user + 10 system of 100), cpu2 idle: 1 of 2 usable cores -> busy
    assert run({0: (90, 0, 10, 0, 0, 0, 0, 0), 2: (0, 0, 0, 100, 0, 0, 0, 0)}) is True
    # each 40% busy, waiting on disk counts as idle: 0.8 cores -> not busy
    assert run({0: (40, 0, 0, 50, 10, 0, 0, 0), 2: (30, 0, 10, 60, 0, 0, 0, 0)}) is False
    # cpu1 (not ours) fully busy: not counted
    assert run({1: (100, 0, 0, 0, 0, 0, 0, 0), 0: (0, 0, 0, 100, 0, 0, 0, 0),
                2: (0, 0, 0, 100, 0, 0, 0, 0)}) is False
    stat.unlink()
    assert machine.cpu_busy_now() is None


def test_a_quiet_machine_for_measuring(monkeypatch):
    monkeypatch.setattr(machine, "cpu_busy_now", lambda: False)
    monkeypatch.setattr(machine, "cpu_busy", lambda: True)  # the load average of work just done
    assert machine.quiet_for_measuring() is True
    monkeypatch.setattr(machine, "cpu_busy_now", lambda: None)  # no /proc/stat: the load
    assert machine.quiet_for_measuring() is False


def test_available_memory_from_meminfo(tmp_path, monkeypatch):
    info = tmp_path / "meminfo"
    monkeypatch.setattr(machine, "MEMINFO", info)
    info.write_text("MemTotal:       32768000 kB\nMemFree:         1000000 kB\n"
                    "MemAvailable:   25165824 kB\nBuffers:          12345 kB\n")
    assert machine.available_gib() == 24.0  # 25,165,824 KiB / 1,048,576
    info.write_text("MemTotal:       32768000 kB\n")  # kernels before 3.14 lack the line
    assert machine.available_gib() is None
    info.unlink()
    assert machine.available_gib() is None


CPUINFO = """processor\t: {i}
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
cpu MHz\t\t: {mhz}
flags\t\t: fpu sse2 avx512f
"""


def test_identity_is_the_cpu_model_flags_and_cores(tmp_path, cores, monkeypatch):
    info = tmp_path / "cpuinfo"
    monkeypatch.setattr(machine, "CPUINFO", info)
    cores(2)
    info.write_text("\n".join(CPUINFO.format(i=i, mhz=2100.0 + i) for i in range(2)))
    want = hashlib.sha256(b"flags\t\t: fpu sse2 avx512f\nmodel name\t: Intel(R) Xeon(R) "
                          b"Processor\n2").hexdigest()[:16]
    assert machine.identity() == want
    # the clock of the moment is not the machine: the same identity
    info.write_text("\n".join(CPUINFO.format(i=i, mhz=800.0) for i in range(2)))
    assert machine.identity() == want
    cores(1)  # another number of cores: another speed per run
    assert machine.identity() != want
    cores(2)
    info.write_text(CPUINFO.format(i=0, mhz=800.0).replace(" avx512f", ""))
    assert machine.identity() != want
