"""The batch-statistics mode of the inference diagnostics, for every norm of bnlab.norm.NORMS:
each test batch is normalized with its own statistics (closed form), and no analysis ever
changes the model's stored statistics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.infer.batchstats import (
    adapted_copy,
    batch_statistics_copy,
    precise_statistics,
    uses_batch_statistics,
    with_statistics,
)
from bnlab.infer.diagnose import batch_accuracy
from bnlab.norm import NORMS, make_norm

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH_STATS = {"bn", "bn_ref", "bn_posscale", "bn_l2", "batch_renorm", "cumulative", "ghost"}
FIXED_OR_NONE = {"frozen", "group", "layer", "instance", "none"}
# r and d active from the first step, so batch_renorm's training forward differs from BN's
RENORM_NOW = {"warmup_steps": 0, "rmax_ramp_steps": 0, "dmax_ramp_steps": 0}


def net(norm: str, **opts) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), make_norm(norm, 4, **opts), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def data(n=12, seed=0, shift=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g) * 1.5 + shift


def trained(model: nn.Module) -> nn.Module:
    """A few training-mode passes on data of another mean, so the running statistics (and a
    cumulative norm's sums, batch_renorm's r and d) are far from the test batches'."""
    model.train()
    with torch.no_grad():
        for s in range(3):
            model(data(seed=10 + s, shift=-3.0))
    return model.eval()


def state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("norm", NORMS)
def test_no_analysis_changes_the_stored_statistics(norm):
    model = trained(net(norm))
    before = state(model)
    x, y = data(seed=1), torch.arange(12) % 3
    m, _ = batch_statistics_copy(model)
    for b in (2, 5, 12):
        batch_accuracy(m, x, y, b)
    stats = precise_statistics(model, [data(seed=2), data(seed=3)])
    for d in ("pooled", "fvcore"):
        with_statistics(model, stats, d)
    adapted = adapted_copy(model, [data(seed=4, shift=5.0)])
    with torch.no_grad():
        adapted(x)
    assert_same_state(model, before)
    assert not model.training


@pytest.mark.parametrize("norm", NORMS)
def test_batch_statistics_replace_the_running_ones(norm):
    """Layers that use batch statistics: the output does not depend on the running statistics.
    Layers that do not: the mode is eval mode."""
    model = trained(net(norm))
    layer = model[1]
    x = data(seed=5)
    m, names = batch_statistics_copy(model)
    with torch.no_grad():
        out = m(x)
        if names:
            assert names == ["1"] and uses_batch_statistics(layer)
            other = model.__class__(*model)  # same modules; plant other running statistics
            saved = (layer.running_mean.clone(), layer.running_var.clone())
            layer.running_mean.add_(7.0)
            layer.running_var.mul_(5.0)
            m2, _ = batch_statistics_copy(other)
            out2 = m2(x)
            layer.running_mean.copy_(saved[0])
            layer.running_var.copy_(saved[1])
            torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
        else:
            assert not uses_batch_statistics(layer)
            assert torch.equal(out, model(x))
    if norm in BATCH_STATS:
        assert names == ["1"]
    elif norm in FIXED_OR_NONE:
        assert names == []


def closed_form(x: torch.Tensor, gamma, beta, eps: float) -> torch.Tensor:
    x = x.double()
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma.double().view(1, -1, 1, 1) \
        + beta.double().view(1, -1, 1, 1)


CLOSED = [("bn", {}), ("bn", {"convention": "keras"}), ("bn_ref", {}),
          ("batch_renorm", RENORM_NOW), ("cumulative", {}), ("ghost", {"virtual_batch_size": 4}),
          ("bn_posscale", {})]


@pytest.mark.parametrize("norm,opts", CLOSED)
def test_each_batch_is_normalized_by_its_own_statistics(norm, opts):
    torch.manual_seed(1)
    layer = make_norm(norm, 3, **opts)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape) + 0.5)
    model = trained(nn.Sequential(layer))
    x = data(n=9, seed=6)
    m, _ = batch_statistics_copy(model)
    gamma = F.softplus(layer.rho) if norm == "bn_posscale" else layer.weight
    with torch.no_grad():
        got = m(x)
        ref = closed_form(x, gamma.detach(), layer.bias.detach(), float(layer.eps))
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        if norm in ("batch_renorm", "cumulative", "ghost"):
            # their own training forward mixes in other statistics (r and d, earlier
            # batches, virtual batches): that is not the test batch's own statistics
            own = trained(nn.Sequential(make_norm(norm, 3, **opts)))
            own[0].load_state_dict(layer.state_dict())
            assert not torch.allclose(own.train()(x).double(), ref, atol=1e-3)


def test_bn_batch_statistics_equal_torch_training_mode():
    model = trained(net("bn"))
    x = data(seed=7)
    m, _ = batch_statistics_copy(model)
    reference = net("bn")
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference.train()(x), rtol=1e-5, atol=1e-6)


def test_one_value_per_channel_is_refused_like_batchnorm():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    m, _ = batch_statistics_copy(model)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 4))


def test_adabn_holds_the_statistics_of_the_shifted_data():
    """AdaBN on one BN layer: its statistics become the pooled mean and biased variance of the
    new data, exactly as computed in float64."""
    model = trained(nn.Sequential(nn.BatchNorm2d(3)))
    new = [data(n=6, seed=8, shift=4.0), data(n=4, seed=9, shift=4.0)]
    adapted = adapted_copy(model, new)
    x = torch.cat(new).double()
    torch.testing.assert_close(adapted[0].running_mean.double(), x.mean((0, 2, 3)),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(adapted[0].running_var.double(),
                               x.var((0, 2, 3), unbiased=False), rtol=1e-6, atol=1e-6)
    assert not math.isclose(float(model[0].running_mean[0]), float(x.mean()), abs_tol=0.5)
