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


def test_stat_gap_against_the_gaussian_kl_closed_form():
    """Running statistics set by hand against recomputed ones, per channel: KL of
    N(mu, s^2) to N(mu_run, s_run^2) in its textbook form ln(s_run/s) + (s^2 + (mu -
    mu_run)^2) / (2 s_run^2) - 1/2, with s^2 = var + eps on both sides; channel 1 matches."""
    from bnlab.infer.batchstats import LayerStats
    from bnlab.infer.diagnose import stat_gap

    eps = 0.1
    layer = nn.BatchNorm1d(3, eps=eps)
    layer.running_mean.copy_(torch.tensor([0.0, 1.0, -2.0]))
    layer.running_var.copy_(torch.tensor([1.0, 4.0, 0.5]))
    mu = np.array([0.5, 1.0, 0.0])
    var = np.array([1.0, 4.0, 2.0])
    s = LayerStats(mean=torch.tensor(mu, dtype=torch.float64),
                   var=torch.tensor(var, dtype=torch.float64), avg_mean=None, avg_var=None,
                   values=100, batches=1, batch_values=100)
    g = stat_gap(layer, s)
    mu_run, sd_run = np.array([0.0, 1.0, -2.0]), np.sqrt(np.array([1.0, 4.0, 0.5]) + eps)
    sd = np.sqrt(var + eps)
    kl = np.log(sd_run / sd) + (sd**2 + (mu - mu_run) ** 2) / (2 * sd_run**2) - 0.5
    shift = np.abs(mu_run - mu) / sd
    ratio = np.abs(2 * np.log(sd_run / sd))
    assert kl[1] == 0 and shift[1] == 0 and ratio[1] == 0  # the matching channel
    # float32 running statistics: the set values are exact in float32 except 0.1 (eps)
    for key, ref in (("kl", kl), ("mean_shift", shift), ("var_logratio", ratio)):
        assert g[f"{key}_mean"] == pytest.approx(ref.mean(), rel=1e-6), key
        assert g[f"{key}_max"] == pytest.approx(ref.max(), rel=1e-6), key
    # the third channel: mean 2 stds of the data away, variance 2.1 against 0.6
    assert g["mean_shift_max"] == pytest.approx(2 / np.sqrt(2.1), rel=1e-6)


def _res(eval_acc=0.50, precise=0.55, test=0.85, n=10_000):
    """A diagnose result with train mode 0.90 at the largest batch size (256)."""
    gaps = [{"layer": f"l{i}", "kl_mean": k, "mean_shift_mean": 0.1, "var_logratio_mean": 0.2}
            for i, k in enumerate((0.5, 2.0, 1.0, 0.1))]
    res = {"eval_acc": eval_acc, "n_test": n, "train_mode_acc": {"32": 0.70, "256": 0.90},
           "precise_acc": precise, "precise_fvcore_acc": precise,
           "precise": {"batches": 8, "gaps": gaps, "ranking": ["l1", "l2", "l0", "l3"]},
           "test_stats_acc": test}
    if precise is None:
        del res["precise_acc"], res["precise_fvcore_acc"], res["precise"]
    return res


def test_answer_names_which_statistics_recover_the_eval_mode_gap():
    """Eval 0.50 against train mode 0.90 at batch 256 (40 points; the margin is 1 point at
    n = 10,000): halfway is 0.70."""
    from bnlab.infer.diagnose_text import answer

    only_test = answer(_res(precise=0.55, test=0.85))
    assert only_test[0] == ("Eval mode is 40.00 points below train mode: 0.5000 vs 0.9000 at "
                            "batch 256 (10000 test images).")
    assert only_test[1].startswith("Statistics recomputed on the training data do not recover "
                                   "it (0.5500), statistics re-estimated on the test images do "
                                   "(0.8500): the test images differ from the training images")
    assert only_test[2].startswith("Layers whose running statistics disagree most with the "
                                   "training data: l1 (KL 2 nats") and "l3" not in only_test[2]
    # exactly halfway counts as recovering; without PreciseBN only the test statistics speak
    at_half = answer(_res(precise=None, test=0.70))
    assert at_half[1].startswith("Statistics re-estimated on the test images do (0.7000)")
    neither = answer(_res(precise=0.55, test=0.69))
    assert neither[1].startswith("Neither statistics recomputed on the training data (0.5500) "
                                 "nor re-estimated on the test images (0.6900) recover it: the "
                                 "model relies on normalizing each batch by its own statistics")
    precise = answer(_res(precise=0.75, test=0.85))
    assert precise[1].startswith("Statistics recomputed on 8 training batches recover it "
                                 "(0.7500 pooled, 0.7500 fvcore)")
    # a gap within the margin is no gap: 2 binomial standard errors of 0.85 at n = 100 are
    # 2 sqrt(0.85 * 0.15 / 100) = 7.14 points, more than the 5 points here
    close = answer(_res(eval_acc=0.85, n=100))
    assert close[0] == ("Eval mode is not worse than train mode: 0.8500 vs 0.9000 at batch 256 "
                        "(difference +5.00 points, within 7.14).")
