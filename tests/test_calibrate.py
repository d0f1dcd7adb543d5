"""Estimates scaled to this CPU: the measured factor (bnlab.study.calibrate), its cache, and
the estimate's use of it and of parallel workers (bnlab.study.estimate)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from bnlab import machine
from bnlab.config import RunConfig
from bnlab.study import calibrate
from bnlab.study.estimate import CALIBRATED, LONE, OWN_SOURCE, estimate, rate_key

RUN = RunConfig(dataset="cifar10", model="resnet20", limit_train=5000, limit_test=2000,
                epochs=3, batch_size=64, precision="bf16", device="cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache on an idle machine."""
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(machine, "quiet_for_measuring", lambda: True)
    return tmp_path / "cache"


def test_the_factor_scales_the_table_and_workers_divide_the_time():
    base = estimate([RUN] * 4, "cpu").minutes
    slow = estimate([RUN] * 4, "cpu", speed=0.25)
    assert slow.minutes == pytest.approx(4 * base) and slow.sources == (CALIBRATED,)
    assert estimate([RUN] * 4, "cpu", speed=0.25, workers=2).minutes == pytest.approx(2 * base)


def test_a_folder_s_own_rate_is_not_scaled_again():
    """A rate measured by the folder's own runs is this machine's already."""
    own = {rate_key(RUN): 500.0}
    mine = estimate([RUN], "cpu", own=own)
    assert mine.sources == (OWN_SOURCE,)
    assert estimate([RUN], "cpu", own=own, speed=0.1).minutes == pytest.approx(mine.minutes)


def test_the_table_rate_of_a_setting():
    assert calibrate.table_rate("fp32", 128) == LONE[("cifar-resnet", "cpu")].images_per_s
    assert calibrate.table_rate("bf16", 64) > calibrate.table_rate("fp32", 64)


def test_measured_once_per_setting_then_read_from_the_cache(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "measure",
                        lambda p, b, t, slower=None: calls.append((p, b, t)) or 350.0)
    lines = []
    f = calibrate.speed("bf16", 64, 1, lines.append)
    assert f == pytest.approx(350.0 / calibrate.table_rate("bf16", 64))
    assert calibrate.speed("bf16", 64, 1) == f and calls == [("bf16", 64, 1)]
    assert len(lines) == 1 and "350 images/s" in lines[0]
    calibrate.speed("fp32", 128, 2)
    assert calls[-1] == ("fp32", 128, 2)
    assert calibrate.cached_speed("fp32", 128, 2) == pytest.approx(
        350.0 / calibrate.table_rate("fp32", 128))
    assert len(json.loads((cache / calibrate.FILE).read_text())) == 2


def test_the_cached_factor_is_the_setting_s_own(cache, monkeypatch):
    """`study list` reads the factor of the study's precision and threads, at its batch or the
    nearest measured one; never another precision's or thread count's."""
    rates = {("fp32", 64, 1): 280.0, ("bf16", 128, 2): 170.0, ("fp32", 128, 2): 490.0,
             ("fp32", 256, 1): 300.0}
    monkeypatch.setattr(calibrate, "measure", lambda p, b, t, slower=None: rates[(p, b, t)])
    for p, b, t in rates:
        calibrate.speed(p, b, t)
    own = {k: r / calibrate.table_rate(k[0], k[1]) for k, r in rates.items()}
    assert calibrate.cached_speed("fp32", 64, 1) == pytest.approx(own[("fp32", 64, 1)])
    assert calibrate.cached_speed("fp32", 128, 2) == pytest.approx(own[("fp32", 128, 2)])
    assert calibrate.cached_speed("fp32", 96, 1) == pytest.approx(own[("fp32", 64, 1)])
    assert calibrate.cached_speed("fp32", 200, 1) == pytest.approx(own[("fp32", 256, 1)])
    assert calibrate.cached_speed("bf16", 128, 1) is None
    assert calibrate.cached_speed("bf16", 64, 2) == pytest.approx(own[("bf16", 128, 2)])


def test_a_busy_machine_s_measurement_is_used_by_its_process_not_kept(cache, monkeypatch):
    rates = iter([100.0, 300.0])
    monkeypatch.setattr(calibrate, "measure", lambda p, b, t, slower=None: next(rates))
    monkeypatch.setattr(machine, "quiet_for_measuring", lambda: False)
    assert calibrate.speed("fp32", 128, 2) == pytest.approx(100.0 / 1050)
    assert calibrate.cached_speed("fp32", 128, 2) is None
    assert calibrate.speed("fp32", 128, 2) == pytest.approx(100.0 / 1050)  # this process's
    monkeypatch.setattr(calibrate, "_UNKEPT", {})  # the next process
    monkeypatch.setattr(machine, "quiet_for_measuring", lambda: True)
    assert calibrate.speed("fp32", 128, 2) == pytest.approx(300.0 / 1050)
    assert calibrate.cached_speed("fp32", 128, 2) == pytest.approx(300.0 / 1050)


def test_busy_is_judged_before_the_measurement_loads_the_machine(tmp_path, monkeypatch):
    """bnlab.machine.cpu_busy_now (other work on half the usable cores, from the CPUs' busy
    time) read before measuring: the measurement's own threads do not make an idle machine
    busy, and work that ended before (the 1-minute load average still high) does not either."""
    cache = tmp_path / "cache"  # the real quiet_for_measuring, on a faked 2-core machine
    monkeypatch.setenv("BNLAB_CACHE", str(cache))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 0.0, 0.0))  # a decode just ended
    busy = {"now": 0.1}  # cores' worth of other work now
    reads = iter(range(100))

    def cpu_times(cpus):
        k = next(reads) % 2  # (busy, total) jiffies of 2 CPUs over 100 jiffies each
        return (int(busy["now"] * 100) * k, 200 * k)

    monkeypatch.setattr(machine, "_cpu_times", cpu_times)

    def measure(p, b, t, slower=None):
        busy["now"] = 2.0  # what two threads of measuring add
        return 100.0

    monkeypatch.setattr(calibrate, "measure", measure)
    calibrate.speed("fp32", 128, 2)
    assert calibrate.cached_speed("fp32", 128, 2) == pytest.approx(100.0 / 1050)  # kept
    busy["now"] = 1.0  # other work on half the cores before measuring: used, not kept
    monkeypatch.setattr(calibrate, "measure", lambda p, b, t, slower=None: 50.0)
    assert calibrate.speed("bf16", 64, 1) == pytest.approx(
        50.0 / calibrate.table_rate("bf16", 64))
    assert len(json.loads((cache / calibrate.FILE).read_text())) == 1


def test_a_damaged_cache_is_measured_again(cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / calibrate.FILE).write_text("{not json")
    assert calibrate.cached_speed("fp32", 128, 2) is None
    monkeypatch.setattr(calibrate, "measure", lambda p, b, t, slower=None: 100.0)
    assert calibrate.speed("fp32", 128, 2) == pytest.approx(100.0 / 1050)


def test_another_machine_does_not_read_this_one_s_factor(cache, monkeypatch):
    monkeypatch.setattr(calibrate, "measure", lambda p, b, t, slower=None: 100.0)
    calibrate.speed("fp32", 128, 2)
    monkeypatch.setattr(machine, "identity", lambda: "another")
    assert calibrate.cached_speed("fp32", 128, 2) is None


def test_a_real_measurement_runs_at_the_threads_asked_and_restores_them():
    before = torch.get_num_threads()
    rate = calibrate.measure("fp32", 8, 1)
    assert 0 < rate < 1e6 and torch.get_num_threads() == before


def test_a_measurement_far_below_the_rate_that_matters_stops_after_one_step(monkeypatch):
    steps = []
    real = torch._foreach_add_
    monkeypatch.setattr(torch, "_foreach_add_", lambda *a, **k: steps.append(1) or real(*a, **k))
    rate = calibrate.measure("fp32", 8, 1, slower_than=1e12)  # no CPU steps this fast
    assert len(steps) == 1 and 0 < rate < 1e12 / calibrate.GIVE_UP
    steps.clear()
    calibrate.measure("fp32", 8, 1, slower_than=1e-3)  # every CPU does: measured in full
    assert len(steps) >= calibrate.WARMUP_STEPS + 2


def test_study_run_s_first_line_on_this_cpu(cache, monkeypatch, tmp_path):
    """quick on a 2-core machine measured at 350 images/s a run: its table time scaled by the
    factor and halved by the two runs at once, and the line says so."""
    from bnlab.study import status
    from bnlab.study.spec import expand, load_spec

    monkeypatch.setattr(calibrate, "measure", lambda p, b, t, slower=None: 350.0)
    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    monkeypatch.setattr(machine, "available_gib", lambda: 24.0)
    plan = expand(load_spec("quick"))
    todo, _ = status.remaining(plan, tmp_path / "new")
    table = estimate(todo, "cpu", plan.spec.estimate.get("sizes")).minutes
    factor = 350.0 / calibrate.table_rate(todo[0].precision, todo[0].batch_size)
    line, left = status.plan_estimate(plan, tmp_path / "new", "auto")
    assert left == 9
    assert "on this CPU, 2 runs at once" in line and f"scaled to this CPU: {factor:.2f} x" in line
    assert status.fmt_minutes(table / factor / 2) in line


def test_study_list_estimates_quick_as_study_run_will_train_it(cache, monkeypatch, tmp_path):
    """After `study run` measured this CPU, `study list`'s CPU column for quick is the first
    line's estimate: the table scaled by the same setting's factor, two runs at once; a
    factor of another setting (bf16, 2 threads) is not read."""
    from bnlab.study import status
    from bnlab.study.spec import expand, load_spec

    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    monkeypatch.setattr(machine, "available_gib", lambda: 24.0)
    monkeypatch.setattr(status, "DEFAULT_ROOT", tmp_path / "studies-out")
    plan = expand(load_spec("quick"))
    todo, _ = status.remaining(plan, None)
    table = estimate(todo, "cpu", plan.spec.estimate.get("sizes")).minutes

    def row(text: str) -> str:
        return next(line for line in text.splitlines() if line.startswith("quick "))

    monkeypatch.setattr(calibrate, "measure", lambda p, b, t, slower=None: 40.0)
    calibrate.speed("bf16", 64, 2)  # another setting's factor
    assert status.fmt_minutes(table / 2) in row(status.list_text())
    monkeypatch.setattr(calibrate, "measure", lambda p, b, t, slower=None: 350.0)
    # quick's precision "auto": both measured at its setting, equal here, so fp32
    plan = status.resolve_auto_precision(plan, tmp_path / "new", "auto")
    assert plan.auto_precision == "fp32" and {r.cfg.precision for r in plan.all_runs} == {"fp32"}
    line, _ = status.plan_estimate(plan, tmp_path / "new", "auto")
    factor = 350.0 / calibrate.table_rate("fp32", todo[0].batch_size)
    assert status.fmt_minutes(table / factor / 2) in line
    listed = row(status.list_text())
    assert status.fmt_minutes(table / factor / 2) + " (this CPU)" in listed


def test_study_list_reads_a_begun_study_as_its_folder_planned_it(cache, monkeypatch, tmp_path):
    """quick run with --data-map (the README's main job) and precision auto: `study list` finds
    its runs under the ids that folder gave them (another dataset, bf16), not the spec's."""
    from bnlab.study import status
    from bnlab.study.spec import expand, load_spec

    monkeypatch.setattr(status, "DEFAULT_ROOT", tmp_path / "studies-out")
    folder = tmp_path / "studies-out" / "quick"
    plan = expand(load_spec("quick"), data_map={"cifar10": "synthetic"}, auto_precision="bf16")
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps(plan.study_json()))
    assert plan.runs[0].run_id not in {r.run_id for r in expand(load_spec("quick")).runs}

    def row() -> str:
        return next(line for line in status.list_text().splitlines()
                    if line.startswith("quick "))

    assert "done" not in row()
    for r in plan.all_runs:
        (folder / r.run_id).mkdir()
        (folder / r.run_id / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert row().split()[2:4] == ["done", "done"]


def test_a_short_study_is_not_measured(cache, monkeypatch, tmp_path):
    """Under a minute by the table: the table's estimate, no 2 s of measuring."""
    from bnlab.study import status
    from bnlab.study.spec import expand, load_spec

    monkeypatch.setattr(calibrate, "measure", lambda p, b, t, slower=None: pytest.fail("measured"))
    spec = tmp_path / "tiny.toml"
    spec.write_text('name = "tiny"\n[base]\ndataset = "synthetic"\nmodel = "resnet20"\n'
                    'epochs = 1\ndevice = "cpu"\n[grid]\nseed = [0, 1]\n')
    line, left = status.plan_estimate(expand(load_spec(str(spec))), tmp_path / "o", "auto")
    assert left == 2 and "(from bnlab's table of measured rates)" in line


MLP = RunConfig(dataset="mnist", model="mlp3x100", limit_train=6000, limit_test=1000, epochs=2,
                batch_size=60, device="cpu")


def test_the_factor_scales_only_the_families_whose_rates_rest_on_resnet_20():
    """ResNet-20's factor says nothing of an MLP's speed: the MLP keeps the table's 28,600
    images/s (bn-paper-mnist's runs), named as unscaled; a VGG, whose rate is ResNet-20's over
    a measured ratio, is scaled with it."""
    mlp_minutes = 2 * (6000 + 1000 / 3) / 28_600 / 60  # epochs x (train + test / 3) / rate
    for speed in (None, 0.25):
        est = estimate([MLP], "cpu", speed=speed)
        assert est.minutes == pytest.approx(mlp_minutes)
        assert est.sources == (LONE[("mlp", "cpu")].source,) and est.unscaled == ("mlp3x100",)
    resnet = estimate([RUN], "cpu").minutes
    both = estimate([RUN, MLP], "cpu", speed=0.25)
    assert both.minutes == pytest.approx(resnet / 0.25 + mlp_minutes)
    assert set(both.sources) == {CALIBRATED, LONE[("mlp", "cpu")].source}
    vgg = dataclasses.replace(RUN, model="vgg16", precision="fp32")
    assert estimate([vgg], "cpu", speed=0.25).minutes == pytest.approx(
        4 * estimate([vgg], "cpu").minutes)
    assert estimate([vgg], "cpu", speed=0.25).unscaled == ()


def test_a_study_of_mlps_is_not_measured_and_says_so(cache, monkeypatch, tmp_path):
    """bn-paper-mnist on a 2-core machine: the table's MLP time of its 6 runs, two at once,
    without a ResNet-20 measurement."""
    from bnlab.study import status
    from bnlab.study.spec import expand, load_spec

    monkeypatch.setattr(calibrate, "measure", lambda p, b, t, slower=None: pytest.fail("measured"))
    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    monkeypatch.setattr(machine, "available_gib", lambda: 24.0)
    # 50 epochs of 60,000 images and a third of 10,000 test images, and 101 probes (step 0,
    # then every 500 of the 50,000 steps) of 20 training steps of 60 images each
    run = 50 * (60_000 + 10_000 / 3) + 101 * 20 * 60
    line, left = status.plan_estimate(expand(load_spec("bn-paper-mnist")), tmp_path / "o",
                                      "auto")
    assert left == 6
    assert f"estimated {status.fmt_minutes(6 * run / 28_600 / 60 / 2)} " in line
    assert "2 runs at once" in line and "scaled to this CPU" not in line
    assert "mlp3x100 not scaled: this CPU's factor is a ResNet-20 measurement" in line


MIXED = """name = "mixed"
[base]
dataset = "mnist"
epochs = 4
device = "cpu"
[grid]
model = ["mlp3x100", "resnet20"]
[[cases]]
where = { model = "mlp3x100" }
set = { batch_size = 60 }
[[cases]]
where = { model = "resnet20" }
set = { batch_size = 128, precision = "bf16" }
"""


def test_a_mixed_study_measures_at_the_resnet_s_setting_and_scales_only_it(
        cache, monkeypatch, tmp_path):
    """The MLP run comes first, but the measurement is of the ResNet's precision and batch;
    the ResNet trains at the measured 350 images/s (28 px images: (28/32)^2 of a 32 px one's
    cost), the MLP at the table's 28,600."""
    from bnlab.study import status
    from bnlab.study.spec import expand, load_spec

    calls = []
    monkeypatch.setattr(calibrate, "measure",
                        lambda p, b, t, slower=None: calls.append((p, b, t)) or 350.0)
    monkeypatch.setattr(machine, "usable_cores", lambda: 2)
    spec = tmp_path / "mixed.toml"
    spec.write_text(MIXED)
    plan = expand(load_spec(str(spec)))
    assert [r.cfg.model for r in plan.all_runs][0] == "mlp3x100"
    line, left = status.plan_estimate(plan, tmp_path / "o", 1)
    assert left == 2 and calls == [("bf16", 128, 2)]
    images = 4 * (60_000 + 10_000 / 3)
    minutes = images * (28 / 32) ** 2 / 350 / 60 + images / 28_600 / 60
    assert f"estimated {status.fmt_minutes(minutes)} " in line
    factor = 350.0 / calibrate.table_rate("bf16", 128)
    assert f"scaled to this CPU: {factor:.2f} x" in line and "; mlp3x100 not scaled" in line
