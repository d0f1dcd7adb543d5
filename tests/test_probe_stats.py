"""Probe measurements against the whole tensor: planted tensors that defeat a fixed-stride
sample, per-unit percentiles, the private generator, and the forward order of Fixup and
SkipInit ResNets.

Tolerance of a sampled percentile. A percentile taken on n positions drawn uniformly with
replacement sits at level q' of the whole tensor's distribution, where the number of draws below
the whole tensor's q-quantile is Binomial(n, q): q' = q within sd sqrt(q (1 - q) / n). The
checks accept the whole tensor's quantiles at levels q ± 5 sd (n = 2^16: ±0.0070 at q = 0.15,
±0.0098 at q = 0.5); a binomial count falls outside 5 sd with probability below 1e-6.
"""

import math

import numpy as np
import pytest
import torch

from bnlab.models import build_model
from bnlab.train.probe_stats import (
    MAX_QUANTILE_ELEMENTS,
    QUANTILES,
    activation_stats,
    choose_units,
    generator,
    unit_stats,
)
from bnlab.train.probes import forward_rank

pytestmark = pytest.mark.usefixtures("one_thread")
SDS = 5.0


def band(values: np.ndarray, q: float, n: int = MAX_QUANTILE_ELEMENTS) -> tuple[float, float]:
    """The whole tensor's quantiles at levels q -/+ SDS binomial sds of an n-draw sample."""
    sd = math.sqrt(q * (1 - q) / n)
    return (float(np.quantile(values, max(0.0, q - SDS * sd))),
            float(np.quantile(values, min(1.0, q + SDS * sd))))


def assert_in_band(got: float, values: np.ndarray, q: float) -> None:
    lo, hi = band(values, q)
    assert lo <= got <= hi, (q, got, lo, hi)


def stride_quantile(values: np.ndarray, q: float) -> float:
    """What a sample with a fixed stride (ceil(numel / 2^16)) reads: the defect being tested."""
    stride = -(-values.size // MAX_QUANTILE_ELEMENTS)
    return float(np.quantile(values[::stride], q))


def planted_column() -> torch.Tensor:
    """ResNet-20's first activation at batch 128, (128, 16, 32, 32): column w = 0 at 0, the
    rest uniform on [1, 2). Its 2^21 elements make a fixed stride of 32 = W."""
    g = torch.Generator().manual_seed(1)
    t = 1.0 + torch.rand(128, 16, 32, 32, generator=g)
    t[..., 0] = 0.0
    return t


def planted_channel() -> torch.Tensor:
    """An (N, C) activation (8192, 16) whose odd features sit at 10 + uniform[0, 1), the even
    ones at uniform[0, 1): a stride of 2 reads the even features only."""
    g = torch.Generator().manual_seed(2)
    t = torch.rand(8192, 16, generator=g)
    t[:, 1::2] += 10.0
    return t


@pytest.mark.parametrize("make", [planted_column, planted_channel])
def test_pooled_percentiles_of_a_planted_tensor_are_the_whole_tensors(make):
    t = make()
    whole = t.double().numpy().ravel()
    got = activation_stats(t, generator(7))
    for q in QUANTILES:
        assert_in_band(got[f"act_p{round(100 * q)}"], whole, q)
    # the structure is planted where a fixed stride looks: it would miss the band
    assert any(not band(whole, q)[0] <= stride_quantile(whole, q) <= band(whole, q)[1]
               for q in QUANTILES)
    assert got["act_mean"] == pytest.approx(whole.mean(), rel=1e-5)
    assert got["act_std"] == pytest.approx(whole.std(), rel=1e-4)


def test_small_tensor_percentiles_are_exact():
    t = torch.randn(60, 100, generator=torch.Generator().manual_seed(3))
    got = activation_stats(t)
    for q in QUANTILES:
        assert got[f"act_p{round(100 * q)}"] == pytest.approx(
            np.quantile(t.double().numpy(), q), rel=1e-5)


def test_unit_percentiles_of_a_planted_conv_tensor():
    """Channel c of (128, 8, 32, 32) holds c + uniform[0, 1) except its column w = 0 (at -5):
    each unit's 131,072 values are sampled and must match that channel's own quantiles."""
    g = torch.Generator().manual_seed(4)
    t = torch.rand(128, 8, 32, 32, generator=g) + torch.arange(8.0).view(1, 8, 1, 1)
    t[..., 0] = -5.0
    got = unit_stats(t, [0, 3, 7], generator(11))
    assert set(got) == {0, 3, 7}
    for c, stats in got.items():
        values = t[:, c].double().numpy().ravel()
        assert values.size > MAX_QUANTILE_ELEMENTS  # the sampled path
        for q in QUANTILES:
            assert_in_band(stats[f"unit_p{round(100 * q)}"], values, q)
        assert stats["unit_p50"] == pytest.approx(c + 0.5, abs=0.02)  # the planted shift


def test_unit_percentiles_of_a_linear_activation_are_exact():
    t = torch.randn(60, 100, generator=torch.Generator().manual_seed(5)) * 3 + 1
    got = unit_stats(t, [2, 50], generator(0))
    for c in (2, 50):
        for q in QUANTILES:
            assert got[c][f"unit_p{round(100 * q)}"] == pytest.approx(
                np.quantile(t[:, c].double().numpy(), q), rel=1e-5, abs=1e-6)


def test_sampling_leaves_the_global_rng_alone_and_repeats_with_its_seed():
    t = planted_column()
    state = torch.get_rng_state()
    a = activation_stats(t, generator(5))
    b = unit_stats(t, [1, 2], generator(5))
    assert torch.equal(torch.get_rng_state(), state)
    assert activation_stats(t, generator(5)) == a and unit_stats(t, [1, 2], generator(5)) == b


def test_units_are_fixed_by_the_layer_alone():
    a = choose_units("hidden.2.sigmoid", 100)
    assert a == choose_units("hidden.2.sigmoid", 100) == sorted(a)
    assert len(set(a)) == 3 and all(0 <= u < 100 for u in a)
    assert choose_units("x", 2) == [0, 1]  # fewer units than asked for: all of them
    # another layer of the same width draws its own units (independent permutations agree
    # on all three of 100 with probability 1 / C(100, 3))
    assert choose_units("hidden.1.sigmoid", 100) != a


# -- forward order ---------------------------------------------------------------------------
def _fixup_block(i: int) -> list[str]:
    """BasicBlock.forward with Fixup's scalars: conv1(x + bias1a), + bias1b, relu,
    conv2(. + bias2a), * scale, + bias2b (the no-norm convs carry biases)."""
    b = f"blocks.{i}."
    return [b + "bias1a", b + "conv1.weight", b + "conv1.bias", b + "bias1b", b + "bias2a",
            b + "conv2.weight", b + "conv2.bias", b + "scale", b + "bias2b"]


def _skipinit_block(i: int) -> list[str]:
    """relu(n1(conv1(x))), n2(conv2(.)), * scale."""
    b = f"blocks.{i}."
    return [b + "conv1.weight", b + "n1.weight", b + "n1.bias", b + "conv2.weight",
            b + "n2.weight", b + "n2.bias", b + "scale"]


@pytest.mark.parametrize("norm,init,stem,block", [
    ("none", "fixup", ["conv1.weight", "conv1.bias"], _fixup_block),
    ("bn", "skipinit", ["conv1.weight", "n1.weight", "n1.bias"], _skipinit_block),
])
def test_forward_rank_is_the_forward_order_of_fixup_and_skipinit(norm, init, stem, block):
    torch.manual_seed(0)
    model = build_model("resnet20", 10, norm=norm, init=init)
    named = [(n, p) for n, p in model.named_parameters()]
    rank = forward_rank(model, torch.randn(2, 3, 8, 8), [p for _, p in named])
    order = [n for _, _, n in sorted((r, i, n) for i, ((n, _), r) in enumerate(zip(named, rank)))]
    expected = stem + [n for i in range(9) for n in block(i)] + ["fc.weight", "fc.bias"]
    assert order == expected
    assert [n for n, _ in named] != expected  # registration order is not the forward order
    assert all(math.isfinite(r) for r in rank)
