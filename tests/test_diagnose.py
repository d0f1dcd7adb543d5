"""BN inference diagnostics: PreciseBN against closed-form pooled statistics, sanity checks,
the batch-size sweep and the norm-type dispatch."""

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.config import from_mapping
from bnlab.data.synthetic import make_synthetic
from bnlab.infer.diagnose import _batches, diagnose, format_diagnose, precise_statistics, sanity
from bnlab.infer.loading import Loaded
from bnlab.models import build_for

pytestmark = pytest.mark.usefixtures("one_thread")


def batches(seed=0, n=3, b=5):
    g = torch.Generator().manual_seed(seed)
    # channels with different means and scales, so a wrong axis or divisor shows
    return [torch.randn(b, 2, 3, 3, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
            + torch.tensor([0.5, -2.0]).view(1, 2, 1, 1) for _ in range(n)]


def pooled(bs):
    x = np.concatenate([b.numpy() for b in bs]).astype(np.float64)
    return x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)


def test_precise_statistics_both_definitions_against_closed_forms():
    """Batches of 5, 5 and 3 images: the pooled statistics are those of all values together
    (biased variance), fvcore's the plain averages of per-batch means and unbiased variances."""
    # float64 model and data: per-batch statistics are computed in the input's precision
    model = nn.Sequential(nn.BatchNorm2d(2)).double().eval()
    bs = [b.double() for b in batches(n=2) + batches(seed=3, n=1, b=3)]
    s = precise_statistics(model, bs)["0"]
    ref = pooled(bs)
    np.testing.assert_allclose(s.mean.numpy(), ref.mean(1), rtol=1e-12)
    np.testing.assert_allclose(s.var.numpy(), ref.var(1, ddof=0), rtol=1e-12)
    per = [pooled([b]) for b in bs]
    np.testing.assert_allclose(s.avg_mean.numpy(), np.mean([p.mean(1) for p in per], 0),
                               rtol=1e-12)
    np.testing.assert_allclose(s.avg_var.numpy(), np.mean([p.var(1, ddof=1) for p in per], 0),
                               rtol=1e-12)
    assert (s.values, s.batches, s.batch_values) == (13 * 9, 3, 5 * 9)
    # the model's own statistics are untouched
    assert torch.equal(model[0].running_mean, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(model[0].running_var, torch.ones(2, dtype=torch.float64))


def test_pooled_variance_is_fvcore_variance_plus_spread_of_batch_means():
    """Equal batches of m values: var = (m-1)/m avg_var + (1/N) sum_b (mean_b - mean)^2."""
    bs = [b.double() for b in batches(seed=4, n=6, b=4)]
    s = precise_statistics(nn.Sequential(nn.BatchNorm2d(2)).double().eval(), bs)["0"]
    m = 4 * 9
    means = torch.stack([torch.from_numpy(pooled([b]).mean(1)) for b in bs])
    spread = ((means - s.mean) ** 2).mean(0)
    torch.testing.assert_close(s.mean, s.avg_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.var, (m - 1) / m * s.avg_var + spread, rtol=1e-10, atol=0)
    assert bool((s.var > (m - 1) / m * s.avg_var).all())  # the batch means differ


def test_precise_statistics_see_batch_statistics_inputs():
    """The second BN's input is the first BN's output normalized with batch statistics."""
    model = nn.Sequential(nn.BatchNorm2d(2, eps=1e-5), nn.BatchNorm2d(2)).eval()
    model[0].weight.data = torch.tensor([2.0, 0.5])
    model[0].bias.data = torch.tensor([1.0, -1.0])
    bs = batches(seed=1)
    stats = precise_statistics(model, bs)
    outs = []
    for b in bs:
        x = b.double().numpy()
        m = x.mean(axis=(0, 2, 3), keepdims=True)
        v = x.var(axis=(0, 2, 3), keepdims=True)
        y = (x - m) / np.sqrt(v + 1e-5) * np.array([2.0, 0.5]).reshape(1, 2, 1, 1) \
            + np.array([1.0, -1.0]).reshape(1, 2, 1, 1)
        outs.append(y)
    ref = np.concatenate(outs).transpose(1, 0, 2, 3).reshape(2, -1)
    # float32 model: each batch's statistics in float32, merged in float64
    np.testing.assert_allclose(stats["1"].mean.numpy(), ref.mean(1), atol=1e-6)
    np.testing.assert_allclose(stats["1"].var.numpy(), ref.var(1), rtol=1e-5)
    np.testing.assert_allclose(stats["0"].var.numpy(), pooled(bs).var(1), rtol=1e-6)


def test_sanity_finds_planted_problems():
    model = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm2d(3))
    model[0].running_var[1] = float("nan")
    model[0].running_var[2] = 0.0
    model[0].weight.data[3] = 0.0
    model[0].num_batches_tracked.fill_(5)
    issues = sanity(model)
    assert issues == [
        {"layer": "0", "channels": 4, "nonfinite": 1, "near_zero_var": 1, "dead": 1},
        {"layer": "1", "channels": 3, "never_updated": True},
    ]


def test_batches_merge_a_trailing_single_image():
    assert _batches(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert _batches(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert _batches(5, 1) == [(i, i + 1) for i in range(5)]


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(n_train=64, n_test=40, size=8, channels=1)


def loaded_for(norm, bundle, tmp_path):
    cfg = from_mapping(dict(dataset="synthetic", model="mlp3x100", norm=norm, batch_size=16))
    torch.manual_seed(0)
    model = build_for(cfg, bundle)
    x = bundle.train.x[:32].float() / 255
    with torch.no_grad():  # a few training-mode passes give the running statistics values
        model.train()
        for _ in range(3):
            model((x - 0.5) / 0.3)
    return Loaded(tmp_path / "checkpoint.pt", cfg, model.eval(), bundle, torch.device("cpu"))


def test_diagnose_bn_mlp(synthetic, tmp_path):
    res = diagnose(loaded_for("bn", synthetic, tmp_path), (1, 2, 8, 40), precise_batches=2,
                   log=lambda m: None)
    # BatchNorm1d in train mode on one sample: one value per channel, PyTorch refuses
    assert res["train_mode_acc"]["1"] is None
    assert "more than 1 value" in res["train_mode_errors"]["1"]
    for b in ("2", "8", "40"):
        assert 0.0 <= res["train_mode_acc"][b] <= 1.0
    assert res["running_stat_layers"] == 3 and len(res["precise"]["gaps"]) == 3
    assert res["precise"]["gaps"][0]["values_per_channel"] == 32  # 2 batches of 16 rows
    assert res["not_applicable"] == []
    for key in ("precise_acc", "precise_fvcore_acc", "test_stats_acc"):
        assert 0.0 <= res[key] <= 1.0
    assert sorted(res["precise"]["ranking"]) == sorted(g["layer"] for g in res["precise"]["gaps"])
    text = format_diagnose(res)
    assert "with pooled statistics" in text and "fvcore" in text and "answer:" in text


@pytest.mark.parametrize("norm,why", [
    ("none", "no layer keeps running statistics"),
    ("frozen", "the 3 layers with running statistics never use batch statistics"),
    ("layer", "no layer keeps running statistics")])
def test_diagnose_says_what_does_not_apply(synthetic, tmp_path, norm, why):
    res = diagnose(loaded_for(norm, synthetic, tmp_path), precise_batches=2,
                   log=lambda m: None)
    assert "train_mode_acc" not in res and "precise" not in res
    assert why in res["not_applicable"][0]
    assert res["answer"][0].startswith("Train and eval mode normalize alike here")
    assert ("sanity" in res) == (norm == "frozen")


def test_batch_sizes_above_the_test_set_are_reported_as_what_ran(synthetic, tmp_path):
    """40 test images: a requested batch of 1000 runs as one batch of 40, so it is reported as
    40 (once, beside a requested 40), with a note, never as "1000"."""
    loaded = loaded_for("bn", synthetic, tmp_path)
    res = diagnose(loaded, (2, 40, 1000, 64), precise_batches=0, log=lambda m: None)
    assert res["n_test"] == 40 and list(res["train_mode_acc"]) == ["2", "40"]
    assert res["batch_size_note"] == ("batch sizes 1000, 64 are larger than the 40 test "
                                      "images: measured as one batch of 40")
    alone = diagnose(loaded, (40,), precise_batches=0, log=lambda m: None)
    assert res["train_mode_acc"]["40"] == alone["train_mode_acc"]["40"]
    assert "batch_size_note" not in alone
    one = diagnose(loaded, (1000,), precise_batches=0, log=lambda m: None)
    assert list(one["train_mode_acc"]) == ["40"] and one["batch_size_note"].startswith(
        "batch size 1000 is larger")
    text = format_diagnose(res)
    assert "(batch sizes 1000, 64 are larger than the 40 test images" in text
    assert not any(line.split()[:1] == ["1000"] for line in text.splitlines())
