"""Normalization layers: bn_ref against torch's BatchNorm, every layer against its formula."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.errors import UserError
from bnlab.models import build_model
from bnlab.norm import (
    NORMS,
    has_bias_substitute,
    is_norm_layer,
    make_norm,
    zero_scale_refusal,
)
from bnlab.norm import layers as L
from bnlab.norm.table import forward_stats, table_input


def _shape(x):
    return [1, -1] + [1] * (x.dim() - 2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _pair(dim: int, c: int, seed: int):
    torch.manual_seed(seed)
    ref = make_norm("bn_ref", c, dim=dim)
    tor = (nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d)(c)
    with torch.no_grad():
        w, b = torch.randn(c) * 0.5 + 1, torch.randn(c) * 0.3
        for m in (ref, tor):
            m.weight.copy_(w)
            m.bias.copy_(b)
    return ref, tor


def bn_ref_errors(dim: int, n: int, steps: int = 10, seed: int = 0) -> dict[str, float]:
    """Max relative errors of bn_ref vs torch over `steps` training steps + one eval pass."""
    c = 6
    ref, tor = _pair(dim, c, seed)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (n, c, 5, 4) if dim == 2 else (n, c)
    errs = {"forward": 0.0, "grad_input": 0.0, "grad_weight": 0.0, "grad_bias": 0.0,
            "grad_input_scaled": 0.0}
    for _ in range(steps):
        x = torch.randn(shape, generator=g) * 3 + 1.5
        up = torch.randn(shape, generator=g)
        outs = []
        for m in (ref, tor):
            xi = x.clone().requires_grad_(True)
            m.zero_grad()
            y = m(xi)
            (y * up).sum().backward()
            outs.append((y.detach(), xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
        for key, a, b in zip(errs, outs[0], outs[1]):
            errs[key] = max(errs[key], rel_err(a, b))
        # the input gradient's natural size, |w| |g| / sqrt(var_B + eps), as denominator
        sd = torch.sqrt(x.var([d for d in range(x.dim()) if d != 1], unbiased=False) + 1e-5)
        scale = (tor.weight.detach().abs() / sd).view(_shape(x)) * up.abs()
        errs["grad_input_scaled"] = max(errs["grad_input_scaled"], float(
            (outs[0][1] - outs[1][1]).abs().max() / scale.max()))
    errs["running_mean"] = rel_err(ref.running_mean, tor.running_mean)
    errs["running_var"] = rel_err(ref.running_var, tor.running_var)
    ref.eval()
    tor.eval()
    x = torch.randn(shape, generator=g)
    errs["eval"] = rel_err(ref(x).detach(), tor(x).detach())
    return errs


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("n", [2, 3, 17, 64, 256])
def test_bn_ref_equals_torch_batchnorm(dim, n):
    errs = bn_ref_errors(dim, n)
    if dim == 1 and n == 2:
        # Two values per channel: xhat = +-1 up to eps, so the exact input gradient is
        # ~eps/var_B times its natural size and both float32 results are rounding noise
        # relative to it; they must still agree to 1e-5 of the gradient's natural size.
        assert errs.pop("grad_input") < 1.0
    assert max(errs.values()) <= 1e-5, errs


@pytest.mark.parametrize("dim,shape", [(1, (4, 3)), (2, (2, 3, 3, 2))])
def test_bn_ref_gradcheck_float64(dim, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: L.BatchNormFunction.apply(x, w, b, 1e-5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_bn_ref_eval_uses_running_stats_and_refuses_single_values():
    m = make_norm("bn_ref", 3)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        m.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    m.eval()
    x = torch.randn(2, 3, 2, 2)
    expect = (x - m.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        m.running_var.view(1, -1, 1, 1) + 1e-5)
    assert torch.allclose(m(x), expect, atol=1e-6)
    m.train()
    with pytest.raises(ValueError, match="more than 1 value"):
        m(torch.randn(1, 3))


def _f64_bn(x, eps=1e-5):
    x = x.double()
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps), mean, var


def test_posscale_is_softplus_and_starts_as_bn():
    torch.manual_seed(0)
    m = make_norm("bn_posscale", 4)
    x = torch.randn(8, 4, 3, 3) * 2 + 1
    xhat, _, _ = _f64_bn(x)
    assert rel_err(m(x).double(), xhat) < 1e-5
    with torch.no_grad():
        m.rho.copy_(torch.tensor([-30.0, -1.0, 0.0, 5.0]))
    scale = torch.log1p(torch.exp(m.rho.double()))
    assert (m.scale > 0).all()
    assert rel_err(m(x).double(), xhat * scale.view(1, -1, 1, 1)) < 1e-5


@pytest.mark.parametrize("name,reduce", [("bn_l2", "mean"), ("bn_l2_sum", "sum")])
def test_bn_l2_formula_and_eval_denominator(name, reduce):
    """z = softplus(rho) xhat + beta, y = z / sqrt(R(z^2) + eps) with R the batch mean (bn_l2)
    or sum (bn_l2_sum, the literal formula), against a float64 reference; the scale stays > 0;
    eval divides by the running average of the training denominators."""
    torch.manual_seed(0)
    m = make_norm(name, 3)
    with torch.no_grad():
        m.rho.copy_(torch.tensor([0.5413, -3.0, 2.0]))  # softplus: 1.0, 0.0486, 2.127
        m.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    assert (m.scale > 0).all()
    x = torch.randn(6, 3, 4, 4) * 2 + 3
    xhat, _, _ = _f64_bn(x)
    a = torch.log1p(torch.exp(m.rho.detach().double()))
    z = xhat * a.view(1, -1, 1, 1) + m.bias.detach().double().view(1, -1, 1, 1)
    r = (z * z).mean((0, 2, 3), keepdim=True) if reduce == "mean" else \
        (z * z).sum((0, 2, 3), keepdim=True)
    denom = torch.sqrt(r + 1e-5)
    y = m(x).double()
    assert rel_err(y, z / denom) < 1e-5
    m_values = 6 * 4 * 4
    rms = (y ** 2).mean((0, 2, 3)).sqrt()
    expect = torch.ones(3, dtype=torch.float64) * (1.0 if reduce == "mean" else m_values ** -0.5)
    assert torch.allclose(rms, expect, rtol=1e-3)  # unit RMS, or 1/sqrt(m) for the sum
    expect = 0.9 * 1 + 0.1 * denom.flatten()
    assert torch.allclose(m.running_denom.double(), expect, rtol=1e-5)
    m.eval()
    zeval = F.batch_norm(x, m.running_mean, m.running_var, m.scale, m.bias, False, 0, 1e-5)
    assert torch.allclose(m(x), zeval / m.running_denom.view(1, -1, 1, 1), atol=1e-6)


def test_bn_l2_forms_differ_by_sqrt_m_only():
    torch.manual_seed(1)
    x = torch.randn(8, 4, 5, 5)
    mean, total = make_norm("bn_l2", 4), make_norm("bn_l2_sum", 4)
    ratio = (mean(x) / total(x)).double()
    assert torch.allclose(ratio, torch.full_like(ratio, (8 * 5 * 5) ** 0.5), rtol=1e-4)


def test_batch_renorm_warmup_is_bn_then_clips():
    torch.manual_seed(0)
    m = make_norm("batch_renorm", 3, warmup_steps=2, rmax_ramp_steps=2, dmax_ramp_steps=4,
                  rmax=2.0, dmax=1.0)
    xs = [torch.randn(8, 3, 2, 2) * 4 + 6 for _ in range(4)]
    # steps 0, 1: warm-up, r = 1 and d = 0: plain BN
    for x in xs[:2]:
        assert rel_err(m(x).double(), _f64_bn(x)[0]) < 1e-5
    # step 2 (r_max 1 + 1 * 0/2 = 1, d_max 0); step 3: r_max = 1.5, d_max = 0.25
    m(xs[2])
    mu, var = m.running_mean.double().clone(), m.running_var.double().clone()
    x = xs[3]
    xhat, mean_b, var_b = _f64_bn(x)
    sigma_b = torch.sqrt(var_b + 1e-5).flatten()
    sigma = torch.sqrt(var + 1e-5)
    r = (sigma_b / sigma).clamp(1 / 1.5, 1.5)
    d = ((mean_b.flatten() - mu) / sigma).clamp(-0.25, 0.25)
    assert (r == 1.5).any() or (r == 1 / 1.5).any() or (d.abs() == 0.25).any()
    expect = xhat * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)
    assert rel_err(m(x).double(), expect) < 1e-5
    # sigma <- sigma + 0.1 (sigma_B - sigma), stored as running_var = sigma^2 - eps
    new_sigma = sigma + 0.1 * (sigma_b - sigma)
    assert torch.allclose(m.running_var.double(), new_sigma ** 2 - 1e-5, rtol=1e-5)
    assert torch.allclose(m.running_mean.double(), mu + 0.1 * (mean_b.flatten() - mu), rtol=1e-5)
    m.eval()
    ev = (x.double() - m.running_mean.double().view(1, -1, 1, 1)) / new_sigma.view(1, -1, 1, 1)
    assert rel_err(m(x).double(), ev) < 1e-5


def test_cumulative_pools_all_batches_and_first_batch_is_bn():
    torch.manual_seed(0)
    m = make_norm("cumulative", 3)
    x1, x2 = torch.randn(4, 3, 2, 2) + 5, torch.randn(4, 3, 2, 2) * 3 - 1
    a = x1.clone().requires_grad_(True)
    y1 = m(a)
    assert rel_err(y1.double(), _f64_bn(x1)[0]) < 1e-5
    b = x1.clone().requires_grad_(True)
    up = torch.randn_like(x1)
    (y1 * up).sum().backward()
    (nn.BatchNorm2d(3)(b) * up).sum().backward()
    assert rel_err(a.grad, b.grad) < 1e-4
    y2 = m(x2)
    both = torch.cat([x1, x2]).double()
    mean = both.mean((0, 2, 3), keepdim=True)
    var = both.var((0, 2, 3), unbiased=False, keepdim=True)
    assert rel_err(y2.double(), (x2.double() - mean) / torch.sqrt(var + 1e-5)) < 1e-5
    m.eval()
    assert rel_err(m(x1).double(), (x1.double() - mean) / torch.sqrt(var + 1e-5)) < 1e-5


def test_cumulative_gradient_matches_docstring_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    count = torch.tensor(40.0, dtype=torch.float64)
    total = torch.tensor([10.0, -4.0], dtype=torch.float64)
    total_sq = torch.tensor([90.0, 70.0], dtype=torch.float64)

    def fn(x, w, b):
        return L.cumulative_norm(x, count, total, total_sq, w, b, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b))
    g = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    y, mean, var = L.cumulative_norm(x, count, total, total_sq, w, b, 1e-5)
    (y * g).sum().backward()
    n_all = 40 + 12
    sd = torch.sqrt(var + 1e-5).view(1, -1, 1, 1)
    xhat = (x.detach() - mean.view(1, -1, 1, 1)) / sd
    expect = w.detach().view(1, -1, 1, 1) / sd * (
        g - g.sum((0, 2, 3), keepdim=True) / n_all
        - xhat * (g * xhat).sum((0, 2, 3), keepdim=True) / n_all)
    assert torch.allclose(x.grad, expect, atol=1e-10)


def test_ghost_normalizes_each_virtual_batch():
    torch.manual_seed(0)
    m = make_norm("ghost", 3, virtual_batch_size=4)
    x = torch.randn(10, 3, 2, 2) * 2 + 1  # 10 -> ceil(10/4) = 3 chunks of 4, 3, 3
    y = m(x).double()
    starts = [0, 4, 7, 10]
    means, vars_ = [], []
    for s, e in zip(starts[:-1], starts[1:]):
        xhat, mean, var = _f64_bn(x[s:e])
        assert rel_err(y[s:e], xhat) < 1e-5
        k = (e - s) * 4
        means.append(mean.flatten())
        vars_.append(var.flatten() * k / (k - 1))
    assert torch.allclose(m.running_mean.double(), 0.1 * torch.stack(means).mean(0), atol=1e-6)
    assert torch.allclose(m.running_var.double(), 0.9 + 0.1 * torch.stack(vars_).mean(0),
                          atol=1e-6)


def test_frozen_is_fixed_affine_and_loads_bn_state():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn(torch.randn(8, 3, 4, 4) * 3 + 2)
        bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    m = make_norm("frozen", 3)
    m.load_state_dict(bn.state_dict())
    assert not list(m.parameters())
    x = torch.randn(4, 3, 2, 2)
    bn.eval()
    for mode in (True, False):
        m.train(mode)
        assert rel_err(m(x), bn(x).detach()) < 1e-6
    assert torch.equal(m.running_mean, bn.running_mean)


def test_group_layer_instance_match_torch():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 3, 3) * 2 + 1
    layer, inst, grp = make_norm("layer", 16), make_norm("instance", 16), make_norm("group", 16)
    assert grp.num_groups == 8
    assert rel_err(layer(x), F.layer_norm(x, x.shape[1:])) < 1e-5
    assert rel_err(inst(x), F.instance_norm(x)) < 1e-5
    xg = x.view(4, 8, 2 * 9).double()
    ref = ((xg - xg.mean(2, keepdim=True)) / torch.sqrt(xg.var(2, unbiased=False, keepdim=True)
                                                       + 1e-5)).view_as(x)
    assert rel_err(grp(x).double(), ref) < 1e-5
    assert make_norm("group", 100, dim=1, groups=32).num_groups == 4  # gcd(32, 100)


@pytest.mark.parametrize("name", NORMS)
def test_every_norm_train_eval_dims_and_bf16(name):
    torch.manual_seed(0)
    for dim, shape in ((2, (8, 6, 4, 4)), (1, (8, 6))):
        if name == "instance" and dim == 1:
            with pytest.raises(UserError, match="instance"):
                make_norm(name, 6, dim=1)
            continue
        m = make_norm(name, 6, dim=dim)
        x = torch.randn(shape) * 2 + 1
        y = m(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        m.eval()
        assert torch.isfinite(m(x)).all()
        m.train()
    # bf16 autocast after a conv: statistics and buffers stay float32, output is finite
    conv = nn.Conv2d(3, 6, 3, padding=1)
    m = make_norm(name, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(torch.randn(8, 3, 4, 4))
        y = m(h)
        y.float().sum().backward()
    assert h.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    for buf in m.buffers():
        assert buf.dtype in (torch.float32, torch.float64, torch.int64)
    for p in m.parameters():
        assert p.dtype == torch.float32 and p.grad is not None
    if hasattr(m, "running_mean") and name not in ("frozen",):
        ref = make_norm(name, 6)
        ref(h.float())
        assert rel_err(m.running_mean, ref.running_mean) < 1e-5


def test_bias_substitute_and_norm_layer_flags():
    for name in NORMS:
        m = make_norm(name, 4)
        shift = [n for n, _ in m.named_parameters() if n == "bias"]
        assert is_norm_layer(m) == (name != "none")
        # a conv bias is added exactly where the norm neither has a learnable shift nor
        # removes a per-channel constant
        assert has_bias_substitute(name) == (not shift)
    assert has_bias_substitute("group", {"affine": False})
    assert not has_bias_substitute("bn", {"affine": False})  # BN removes a conv bias anyway
    x = torch.randn(8, 4, 3, 3)
    bn = make_norm("bn", 4, affine=False)
    assert torch.allclose(bn(x), bn(x + torch.randn(1, 4, 1, 1)), atol=1e-5)
    assert zero_scale_refusal("bn") is None and "no scale" in zero_scale_refusal("none")


def test_option_errors_are_user_errors():
    with pytest.raises(UserError, match="unknown option 'momentumm' for norm 'bn'"):
        make_norm("bn", 4, momentumm=0.1)
    with pytest.raises(UserError, match="did you mean 'ghost'"):
        make_norm("ghots", 4)
    with pytest.raises(UserError, match="virtual_batch_size"):
        make_norm("ghost", 4, virtual_batch_size=0)
    with pytest.raises(UserError, match="convention"):
        make_norm("bn", 4, convention="tf")
    with pytest.raises(UserError, match="momentum"):
        make_norm("bn_ref", 4, momentum=1.5)


def test_forward_stats_table_and_cli():
    rows = {(r["norm"], r["mode"]): r for r in forward_stats()}
    x = table_input().double()
    assert torch.allclose(x.mean((0, 2, 3)), 2 * torch.arange(4.0, dtype=torch.float64),
                          atol=0.4)
    for name in ("bn", "bn_ref", "ghost", "instance", "cumulative"):
        assert max(abs(v) for v in rows[name, "train"]["mean"]) < 1e-5
        assert max(abs(v - 1) for v in rows[name, "train"]["std"]) < 1e-3
    none = rows["none", "train"]
    assert none["mean"] == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-5)
    # bn's eval output after 10 passes uses running_mean = (1 - 0.9^10) mean_B
    keep = 0.9 ** 10
    mean_b = x.mean((0, 2, 3))
    var_b = x.var((0, 2, 3), unbiased=False)
    m = x[0].numel() * x.shape[0] / x.shape[1]
    rv = keep + (1 - keep) * var_b * m / (m - 1)
    expect = (mean_b - (1 - keep) * mean_b) / torch.sqrt(rv + 1e-5)
    assert rows["bn", "eval"]["mean"] == pytest.approx(expect.tolist(), abs=1e-4)
    out = subprocess.run([sys.executable, "-m", "bnlab", "norms"], capture_output=True,
                         text=True, check=True).stdout
    for name in NORMS:
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    table = subprocess.run([sys.executable, "-m", "bnlab", "norms", "--table"],
                           capture_output=True, text=True, check=True).stdout
    assert table.count("| bn_l2 |") == 2 and "| frozen | eval |" in table
    assert math.isfinite(float(table.split("| bn | train | ")[1].split(" |")[0]))


def test_bn_ref_trains_a_resnet_like_torch_bn():
    from bnlab.models import build_model

    losses = {}
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8) % 10
    for name in ("bn", "bn_ref"):
        torch.manual_seed(0)
        net = build_model("resnet20", 10, norm=name)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        losses[name] = []
        for _ in range(3):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["bn_ref"] == pytest.approx(losses["bn"], rel=1e-4)


@pytest.mark.parametrize("key", ["warmup_steps", "rmax_ramp_steps", "dmax_ramp_steps"])
def test_batch_renorm_step_counts_are_not_negative(key):
    with pytest.raises(UserError, match=f"norm option {key} must be an integer >= 0, got -1"):
        make_norm("batch_renorm", 4, **{key: -1})
    m = make_norm("batch_renorm", 4, **{key: 0})  # 0 is the edge: no warm-up, no ramp
    assert m.schedule[key] == 0


def test_ghost_of_one_example_is_refused_on_features_not_on_images():
    with pytest.raises(UserError, match="ghost' on \\(N, C\\) features needs "
                                        "virtual_batch_size >= 2.*got 1"):
        make_norm("ghost", 4, dim=1, virtual_batch_size=1)
    with pytest.raises(UserError, match="virtual_batch_size >= 2"):
        build_model("mlp3x100", 10, norm="ghost", norm_options={"virtual_batch_size": 1},
                    in_channels=1, image_size=28)
    two = make_norm("ghost", 4, dim=1, virtual_batch_size=2).train()
    x = torch.randn(6, 4)
    y = two(x)
    for pair in (slice(0, 2), slice(2, 4), slice(4, 6)):  # two examples: +-d / sqrt(d^2 + eps)
        d = (x[pair] - x[pair].mean(0)).double()
        ref = d / (d[0] ** 2 + 1e-5).sqrt()
        assert torch.allclose(y[pair].double(), ref, atol=1e-5)
    one = make_norm("ghost", 4, dim=2, virtual_batch_size=1).train()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    ref = (x - x.mean((2, 3), keepdim=True)) / (x.var((2, 3), unbiased=False,
                                                       keepdim=True) + 1e-5).sqrt()
    y = one(x.float()).double()
    assert torch.allclose(y, ref, atol=1e-5)  # per image over its 25 positions


def test_the_first_unknown_option_is_named_whatever_the_order():
    for opts in ({"zz": 1, "momentumm": 0.1}, {"momentumm": 0.1, "zz": 1},
                 {"eps": "x", "momentumm": 0.1}):  # unknown before a value of the wrong type
        with pytest.raises(UserError, match="unknown option 'momentumm' for norm 'bn'; "
                                            "accepted: affine, convention, eps, momentum$"):
            make_norm("bn", 4, **opts)
