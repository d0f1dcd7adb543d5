"""The report's gradient-norm ratio table (first over last weight layer) on hand-made probe
rows, and on the probes of a real (tiny) training of a plain net."""

from __future__ import annotations

import math

import pytest

from bnlab.config import from_mapping
from bnlab.data.synthetic import make_synthetic
from bnlab.report.arms import Arm
from bnlab.report.gradratio import grad_ratio_table, run_ratio
from bnlab.report.load import Run
from bnlab.store import Store
from bnlab.train import train_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(rows: list[dict], seed: int = 0, status: str = "completed") -> Run:
    return Run(run_id=f"r{seed}", values={"norm": "none", "seed": seed}, dataset="d", seed=seed,
               status=status, config={}, env=None, data=None, model=None,
               summary={"status": status, "test_acc": 0.5}, metrics=[], probes=rows)


def _rows(values: dict[tuple[int, str], float]) -> list[dict]:
    return [{"step": s, "epoch": 0, "layer": layer, "metric": "grad_norm", "value": v}
            for (s, layer), v in values.items()]


def test_ratio_uses_the_first_and_last_layer_at_the_first_and_last_step():
    rows = _rows({(0, "conv1"): 0.5, (0, "blocks.0.conv1"): 9.0, (0, "fc"): 4.0,
                  (10, "conv1"): 3.0, (10, "blocks.0.conv1"): 9.0, (10, "fc"): 1.5,
                  (20, "conv1"): float("nan"), (20, "fc"): 2.0})
    rows.append({"step": 0, "epoch": 0, "layer": "", "metric": "grad_norm", "value": 7.0})
    r = run_ratio(_run(rows))
    assert (r.first_layer, r.last_layer) == ("conv1", "fc")
    # step 20 has no finite value of conv1: the last common step is 10
    assert (r.first_step, r.last_step) == (0, 10)
    assert r.at_first == 0.5 / 4.0 and r.at_last == 3.0 / 1.5


def test_table_mean_and_std_over_seeds_and_a_zero_last_gradient():
    runs = [_run(_rows({(0, "conv1"): a, (0, "fc"): 1.0, (5, "conv1"): b, (5, "fc"): 2.0}), s)
            for s, (a, b) in enumerate([(0.1, 1.0), (0.3, 3.0)])]
    runs.append(_run(_rows({(0, "conv1"): 1.0, (0, "fc"): 0.0}), seed=2))
    arm = Arm("d", (("norm", '"none"'),), runs, [])
    table = grad_ratio_table([arm], 3)
    (row,) = table.rows
    assert row[2:6] == ["conv1", "fc", "3", "0"]
    # ratios at step 0: 0.1, 0.3 (the third run's last-layer gradient is 0: undefined)
    assert row[6] == f"{0.2:.3g} ± {math.sqrt(0.02):.2g}"
    assert row[7] == "0–5" and row[8] == f"{1.0:.3g} ± {math.sqrt(0.5):.2g}"
    assert table.number == 3 and grad_ratio_table([Arm("d", (), [_run([])], [])], 1) is None


def test_ratio_of_a_real_plain_net_run(tmp_path):
    """The table reads what the probes of a training run wrote: plain20 without norm, step 0
    is the initialization, the first layer is the stem conv and the last the classifier."""
    cfg = from_mapping(dict(dataset="synthetic", model="plain20", norm="none", epochs=1,
                            batch_size=8, limit_train=16, limit_test=8, lr=0.01, device="cpu",
                            probe_every=1, augment=False, cpu_kernels=False))
    train_run(cfg, tmp_path, bundle=make_synthetic(16, 8, size=32), log=lambda m: None)
    probes = Store(tmp_path).run(cfg.run_id()).read_rows("probes.jsonl")
    r = run_ratio(_run(probes))
    assert (r.first_layer, r.last_layer, r.first_step, r.last_step) == ("conv1", "fc", 0, 1)
    grad = {(row["step"], row["layer"]): row["value"] for row in probes
            if row["metric"] == "grad_norm"}
    assert r.at_first == grad[(0, "conv1")] / grad[(0, "fc")] > 0
