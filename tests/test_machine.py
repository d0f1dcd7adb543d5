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
