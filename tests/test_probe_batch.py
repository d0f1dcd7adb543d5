"""The fixed probe batch and the drift statistic: the activation probes see the same held-out
images at every step, in every arm and seed (checked against the images picked and normalized
independently here); measuring on them leaves the run's trajectory bit for bit unchanged; with
the weights standing still the fixed batch's percentiles stand still too, where a step's own
batch makes them jitter; and the drift of a series is the closed form on planted series."""

from __future__ import annotations

import math

import pytest
import torch

from bnlab.config import from_mapping
from bnlab.data import data_for
from bnlab.report.probedata import DRIFT_PROBES, drift_window, window_drift
from bnlab.store import Store
from bnlab.train import probes as probes_mod
from bnlab.train import train_run
from bnlab.train.probe_batch import probe_batch

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(dataset="synthetic", model="mlp3x100", limit_train=64, limit_test=48,
            batch_size=16, epochs=1, lr=0.05, device="cpu")


def expected_batch(split, bundle, n):
    """The probe images picked and normalized here: the first n of a seed-0 shuffle, sorted."""
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n].sort().values
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return (split.x[idx].double() / 255 - mean) / std, split.y[idx]


def test_probe_batch_is_held_out_images_picked_once():
    cfg = from_mapping(BASE)
    bundle = data_for(cfg)
    got = probe_batch(bundle, 20, torch.device("cpu"))
    x, y = expected_batch(bundle.test, bundle, 20)
    assert got.split == "test" and len(got.y) == 20
    torch.testing.assert_close(got.x.double(), x, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.y, y)
    # more images asked than the split holds: all of them; 0: none (the training batch)
    assert len(probe_batch(bundle, 10_000, torch.device("cpu")).y) == 48
    assert probe_batch(bundle, 0, torch.device("cpu")) is None
    # with a validation split the probe images come from it, never from the test set
    held = data_for(from_mapping(dict(BASE, val_fraction=0.25)))
    got = probe_batch(held, 8, torch.device("cpu"))
    x, y = expected_batch(held.val, held, 8)
    assert got.split == "validation"
    torch.testing.assert_close(got.x.double(), x, rtol=1e-6, atol=1e-6)


def test_every_step_arm_and_seed_probe_the_same_images(tmp_path, monkeypatch):
    seen = []
    real = probes_mod.measure_on

    def spy(model, batch, precision="fp32"):  # records what was measured, then measures it
        seen.append(batch.x.clone())
        return real(model, batch, precision)

    monkeypatch.setattr(probes_mod, "measure_on", spy)
    for norm, seed in (("bn", 0), ("none", 1), ("bn", 2)):
        cfg = from_mapping(dict(BASE, norm=norm, seed=seed, probe_every=2, probe_images=32))
        train_run(cfg, tmp_path, log=lambda m: None)
    assert len(seen) == 3 * 2  # 4 steps each, probes at steps 0 and 2
    bundle = data_for(from_mapping(BASE))
    x, _ = expected_batch(bundle.test, bundle, 32)
    for got in seen:
        torch.testing.assert_close(got.double(), x, rtol=1e-6, atol=1e-6)


def _train(tmp_path, name, **kw):
    cfg = from_mapping({**BASE, "norm": "bn", "dropout": 0.3, "epochs": 2, **kw})
    train_run(cfg, tmp_path / name, log=lambda m: None)
    return Store(tmp_path / name).run(cfg.run_id())


def test_probing_the_fixed_batch_leaves_the_trajectory_unchanged(tmp_path):
    """Dropout draws and BN running statistics included: the extra forward pass in training
    mode restores both."""
    off = _train(tmp_path, "off", val_fraction=0.25)
    on = _train(tmp_path, "on", val_fraction=0.25, probe_every=1, probe_images=12)
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "val_loss")
    assert [[m[k] for k in keys] for m in off.metrics()] == \
        [[m[k] for k in keys] for m in on.metrics()]
    sa, sb = off.load_checkpoint()["model"], on.load_checkpoint()["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = {r["step"] for r in on.read_rows("probes.jsonl")}
    assert steps == set(range(4))  # 48 training images: 2 steps an epoch


def _p50(run):
    return [r["value"] for r in sorted(run.read_rows("probes.jsonl"), key=lambda r: r["step"])
            if r["layer"] == "hidden.2.sigmoid" and r["metric"] == "act_p50"]


def test_the_fixed_batch_takes_the_batch_noise_out_of_the_percentiles(tmp_path):
    """With a learning rate too small to move the weights, the input of a sigmoid is the same
    function at every step: on the fixed batch its median stays put, on each step's own batch
    it moves with the images."""
    fixed = _p50(_train(tmp_path, "fixed", lr=1e-9, dropout=0.0, probe_every=1))
    own = _p50(_train(tmp_path, "own", lr=1e-9, dropout=0.0, probe_every=1, probe_images=0))
    assert len(fixed) == len(own) == 8
    assert max(fixed) - min(fixed) < 1e-5
    assert max(own) - min(own) > 1e-3


@pytest.mark.parametrize("n", [2, 7, 20, 101])
def test_window_drift_closed_form(n):
    """v_i = a + b i + c (-1)^i: the ends' means differ by b (n - k) plus what the alternating
    term leaves over k values at each end."""
    a, b, c = 3.0, 0.25, 0.8
    vals = [a + b * i + c * (-1) ** i for i in range(n)]
    k = drift_window(n)
    assert k == max(1, min(DRIFT_PROBES, n // 4)) and 2 * k <= n
    alt_first = sum((-1) ** i for i in range(k)) / k
    alt_last = sum((-1) ** i for i in range(n - k, n)) / k
    assert window_drift(vals) == pytest.approx(b * (n - k) + c * (alt_last - alt_first))


def test_window_drift_is_not_inflated_by_noise():
    """A series that does not move: max − min grows with the noise, the drift stays within its
    standard error sqrt(2/k) sigma of 0."""
    g = torch.Generator().manual_seed(0)
    sigma = 0.5
    vals = (sigma * torch.randn(100, generator=g, dtype=torch.float64)).tolist()
    k = drift_window(len(vals))
    se = sigma * math.sqrt(2 / k)
    assert abs(window_drift(vals)) < 3 * se < (max(vals) - min(vals)) / 2
