"""Norm placement in the CIFAR ResNets and the initialization schemes of bnlab.models.init."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bnlab.config import RunConfig
from bnlab.data.synthetic import make_synthetic
from bnlab.errors import UserError
from bnlab.models import build_for, build_model
from bnlab.models.cifar_resnet import CifarResNet, ShortcutA
from bnlab.models.init import fixup_scale, residual_blocks
from bnlab.norm import NORMS, is_norm_layer
from bnlab.train.optim import param_groups

PLACEMENTS = ("post_conv", "post_act", "first_k")
INITS = ("kaiming", "xavier", "fixup", "zero_residual", "skipinit")
NO_ZERO_SCALE = {"none", "frozen", "bn_posscale", "bn_l2", "bn_l2_sum"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def expected_refusal(norm: str, placement: str, init: str) -> str | None:
    """The reason (a word of the message) why a combination is refused, decided independently."""
    if init == "fixup" and norm != "none":
        return "without normalization"
    if init == "zero_residual":
        if norm in NO_ZERO_SCALE:
            return norm
        if placement == "first_k":  # first_k = 1 leaves later blocks without a norm
            return "first_k"
    return None


# -- placement ------------------------------------------------------------------------------------
def test_resnet20_parameter_count_closed_form():
    # convs 3x3: stem 3->16, stage 1: 6 x 16->16, stage 2: 16->32 + 5 x 32->32,
    # stage 3: 32->64 + 5 x 64->64; BN: 2 per channel of 19 norm layers; fc 64 -> 10
    convs = 9 * (3 * 16 + 6 * 16 * 16 + 16 * 32 + 5 * 32 * 32 + 32 * 64 + 5 * 64 * 64)
    bns = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    expect = convs + bns + 64 * 10 + 10
    assert expect == 269722
    net = build_model("resnet20", 10, norm="bn")
    assert sum(p.numel() for p in net.parameters()) == expect


def test_shortcut_a_is_parameter_free_subsample_and_zero_pad():
    x = torch.randn(2, 16, 8, 8)
    s = ShortcutA(16, 32, 2)
    out = s(x)
    assert out.shape == (2, 32, 4, 4) and not list(s.parameters())
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()
    for placement in PLACEMENTS:
        for norm in ("bn", "none"):
            net = build_model("resnet20", 10, norm=norm, placement=placement)
            for b in residual_blocks(net):
                assert isinstance(b.shortcut, ShortcutA) and not list(b.shortcut.parameters())


@pytest.mark.parametrize("placement", ["post_conv", "post_act"])
def test_block_order_matches_placement(placement):
    torch.manual_seed(0)
    net = build_model("resnet20", 10, norm="bn", placement=placement)
    for m in net.modules():  # non-trivial running statistics, then eval mode
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    net.eval()
    x = torch.randn(2, 16, 8, 8)
    for b in residual_blocks(net)[:4]:
        with torch.no_grad():
            if placement == "post_conv":
                ref = F.relu(b.n2(b.conv2(F.relu(b.n1(b.conv1(x))))) + b.shortcut(x))
            else:
                ref = b.n2(F.relu(b.conv2(b.n1(F.relu(b.conv1(x)))))) + b.shortcut(x)
            out = b(x)
        assert torch.allclose(out, ref, atol=1e-6)
        x = out
    stem = net.n1(F.relu(net.conv1(torch.ones(1, 3, 4, 4)))) if placement == "post_act" else \
        F.relu(net.n1(net.conv1(torch.ones(1, 3, 4, 4))))
    assert stem.shape == (1, 16, 4, 4)


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_first_k_has_norms_only_in_stem_and_first_k_blocks(k):
    net = build_model("resnet20", 10, norm="bn", placement="first_k", first_k=k)
    norms = [name for name, m in net.named_modules() if is_norm_layer(m)]
    expect = ["n1"] + [f"blocks.{i}.{n}" for i in range(k) for n in ("n1", "n2")]
    assert norms == expect
    for i, b in enumerate(residual_blocks(net)):
        # blocks without norm get conv biases; blocks with BN do not need them
        assert (b.conv1.bias is None) == (i < k) and (b.conv2.bias is None) == (i < k)
    assert net.conv1.bias is None


def test_first_k_out_of_range_is_refused():
    with pytest.raises(UserError, match="first_k must be between 0 and 9"):
        build_model("resnet20", 10, placement="first_k", first_k=10)


# -- initializations ------------------------------------------------------------------------------
def _block_io(net: nn.Module, x: torch.Tensor):
    pairs = []
    hooks = [b.register_forward_hook(lambda m, i, o: pairs.append((m, i[0], o)))
             for b in residual_blocks(net)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return pairs


@pytest.mark.parametrize("init,norm,placement", [
    ("fixup", "none", "post_conv"), ("fixup", "none", "post_act"),
    ("zero_residual", "bn", "post_conv"), ("zero_residual", "bn", "post_act"),
    ("zero_residual", "group", "post_conv"), ("zero_residual", "batch_renorm", "post_act"),
    ("zero_residual", "bn_ref", "post_conv"), ("zero_residual", "cumulative", "post_conv"),
    ("skipinit", "bn", "post_conv"), ("skipinit", "none", "post_act"),
    ("skipinit", "bn", "first_k"), ("skipinit", "layer", "post_act"),
])
def test_residual_blocks_are_identity_at_init(init, norm, placement):
    torch.manual_seed(0)
    net = build_model("resnet20", 10, norm=norm, init=init, placement=placement)
    x = torch.randn(4, 3, 16, 16)
    pairs = _block_io(net, x)
    assert len(pairs) == 9
    for block, inp, out in pairs:
        assert torch.allclose(out, block.shortcut(inp), atol=1e-6)
        assert inp.abs().max() > 0
    if init == "fixup":
        assert torch.equal(net(x), torch.zeros(4, 10))  # classifier is zero too
    # and the same network with kaiming is not (the check can fail)
    torch.manual_seed(0)
    plain = build_model("resnet20", 10, norm=norm, init="kaiming", placement=placement)
    block, inp, out = _block_io(plain, x)[0]
    assert not torch.allclose(out, block.shortcut(inp), atol=1e-3)


@pytest.mark.parametrize("model,blocks", [("resnet20", 9), ("resnet56", 27), ("resnet110", 54)])
def test_fixup_scale_formula(model, blocks):
    assert fixup_scale(blocks) == pytest.approx(blocks ** -0.5)  # L^(-1/(2m-2)), m = 2
    torch.manual_seed(0)
    kaiming = build_model(model, 10, norm="none", init="kaiming")
    torch.manual_seed(0)
    fixup = build_model(model, 10, norm="none", init="fixup")
    bk, bf = residual_blocks(kaiming), residual_blocks(fixup)
    assert len(bf) == blocks
    for a, b in zip(bk, bf):
        assert torch.allclose(b.conv1.weight, a.conv1.weight * blocks ** -0.5)
        assert (b.conv2.weight == 0).all()
        assert b.scale.item() == 1.0
        assert all(getattr(b, n).item() == 0 for n in ("bias1a", "bias1b", "bias2a", "bias2b"))
    assert torch.equal(fixup.conv1.weight, kaiming.conv1.weight)
    assert (fixup.fc.weight == 0).all() and (fixup.fc.bias == 0).all()


def test_kaiming_fan_modes_xavier_orthogonal():
    torch.manual_seed(0)
    conv = lambda net: residual_blocks(net)[3].conv1.weight.detach()  # noqa: E731  16 -> 32
    w_in = conv(build_model("resnet20", 10, init="kaiming"))
    w_out = conv(build_model("resnet20", 10, init="kaiming", init_options={"mode": "fan_out"}))
    assert w_in.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.05)
    assert w_out.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.05)
    w = conv(build_model("resnet20", 10, init="xavier"))
    bound = (6 / (16 * 9 + 32 * 9)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    w = conv(build_model("resnet20", 10, init="orthogonal")).reshape(32, -1)
    assert torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)
    with pytest.raises(UserError, match="unknown option 'fan' for init 'kaiming'"):
        build_model("resnet20", 10, init_options={"fan": "in"})
    with pytest.raises(UserError, match="mode must be fan_in or fan_out"):
        build_model("resnet20", 10, init_options={"mode": "fan"})


def test_run_config_passes_init_options():
    bundle = make_synthetic(8, 8, size=8)
    cfg = RunConfig(dataset="synthetic", init_options={"mode": "fan_out"}, norm="none")
    torch.manual_seed(0)
    a = build_for(cfg, bundle)
    torch.manual_seed(0)
    b = build_model("resnet20", 10, norm="none", in_channels=3, image_size=8,
                    init_options={"mode": "fan_out"})
    assert torch.equal(a.blocks[3].conv1.weight, b.blocks[3].conv1.weight)


def test_refusals_are_one_line_user_errors():
    cases = [
        (dict(norm="none", init="zero_residual"), "no scale"),
        (dict(norm="frozen", init="zero_residual"), "fixed"),
        (dict(norm="bn_posscale", init="zero_residual"), "> 0"),
        (dict(norm="bn_l2", init="zero_residual"), "> 0"),
        (dict(norm="bn_l2_sum", init="zero_residual"), "> 0"),
        (dict(norm="bn", init="zero_residual", norm_options={"affine": False}), "affine"),
        (dict(norm="bn", init="zero_residual", placement="first_k"), "first_k"),
        (dict(norm="bn", init="fixup"), "norm 'bn'"),
    ]
    for kw, words in cases:
        with pytest.raises(UserError, match=None) as e:
            build_model("resnet20", 10, **kw)
        assert words in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
    for model, init in (("mlp3x100", "fixup"), ("mlp3x100", "skipinit"),
                        ("resnet18", "skipinit")):
        with pytest.raises(UserError, match="CIFAR ResNets"):
            build_model(model, 10, init=init, norm="none", image_size=8)
    with pytest.raises(UserError, match="needs residual blocks"):
        build_model("mlp3x100", 10, init="zero_residual", image_size=8)
    # the command line turns it into one line and exit code 2
    r = subprocess.run([sys.executable, "-m", "bnlab", "train", "--dataset", "synthetic",
                        "--init", "fixup", "--norm", "bn", "--out", "/nonexistent/x"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "fixup" in r.stderr


def test_zero_residual_torchvision_and_param_groups():
    for norm in ("bn", "group"):
        net = build_model("resnet18", 10, norm=norm, init="zero_residual")
        blocks = [m for m in net.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
        assert len(blocks) == 8 and all((b.bn2.weight == 0).all() for b in blocks)
    net = build_model("resnet20", 10, norm="none", init="fixup")
    decay, no_decay = param_groups(net, 5e-4, False)
    ids = {id(p) for p in no_decay["params"]}
    scalars = [getattr(b, n) for b in residual_blocks(net)
               for n in ("bias1a", "bias1b", "bias2a", "bias2b", "scale")]
    assert all(id(p) in ids for p in scalars)
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    for name in NORMS:
        net = build_model("resnet20", 10, norm=name, init="skipinit")
        _, no_decay = param_groups(net, 5e-4, False)
        ids = {id(p) for p in no_decay["params"]}
        for m in net.modules():
            if is_norm_layer(m):
                assert all(id(p) in ids for p in m.parameters())
        assert all(id(b.scale) in ids for b in residual_blocks(net))


@pytest.mark.parametrize("norm", NORMS)
def test_mlp_and_torchvision_with_every_norm(norm):
    torch.manual_seed(0)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    if norm == "instance":
        with pytest.raises(UserError, match="instance"):
            build_model("mlp3x100", 10, norm=norm, in_channels=1, image_size=8)
    else:
        net = build_model("mlp3x100", 10, norm=norm, in_channels=1, image_size=8)
        _step(net, x, y)
    net = build_model("resnet18", 10, norm=norm)
    _step(net, torch.rand(4, 3, 32, 32), y)


def _step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Eval mode after one training-mode pass gives finite outputs; one SGD step changes the
    parameters with a finite loss."""
    net.train()
    with torch.no_grad():
        net(x)
    net.eval()
    with torch.no_grad():
        assert torch.isfinite(net(x)).all()
    net.train()
    opt = torch.optim.SGD(param_groups(net, 5e-4, False), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in net.parameters()]
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))


# -- every combination -----------------------------------------------------------------------------
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("model", ["resnet20", "resnet56"])
def test_every_combination_builds_and_steps(model, norm, placement, init):
    torch.manual_seed(0)
    why = expected_refusal(norm, placement, init)
    if why:
        with pytest.raises(UserError) as e:
            build_model(model, 10, norm=norm, placement=placement, init=init)
        assert why in str(e.value) and "\n" not in str(e.value)
        return
    net = build_model(model, 10, norm=norm, placement=placement, init=init)
    assert isinstance(net, CifarResNet)
    _step(net, torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("name", ["xavier", "orthogonal"])
@pytest.mark.parametrize("gain", [0, 0.0, -1.0])
def test_xavier_and_orthogonal_refuse_a_gain_not_above_zero(name, gain):
    with pytest.raises(UserError, match=f"init option gain must be a number > 0, got {gain}"):
        build_model("resnet20", 10, init=name, init_options={"gain": gain})
    w = residual_blocks(build_model("resnet20", 10, init=name, init_options={"gain": 0.5}))[
        3].conv1.weight.detach().reshape(32, -1)
    if name == "orthogonal":  # gain 0.5: rows orthogonal with norm 0.5
        assert torch.allclose(w @ w.T, 0.25 * torch.eye(32), atol=1e-5)
    else:
        bound = 0.5 * (6 / (16 * 9 + 32 * 9)) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound


@pytest.mark.parametrize("init", ["fixup", "skipinit"])
def test_branch_scalars_keep_bf16_activations_and_fp32_values(init):
    """Under bf16 autocast a Fixup/SkipInit block's activations stay bf16, as a BN block's do
    (an fp32 scalar would promote them to fp32); in fp32 the block computes its formula,
    checked against a float64 evaluation of relu(scale * conv2(relu(conv1(x + b1a) + b1b) +
    b2a) + b2b + x)."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, norm="none", init=init)
    block = model.blocks[0]
    with torch.no_grad():
        for name, value in (("bias1a", 0.1), ("bias1b", -0.2), ("bias2a", 0.3),
                            ("bias2b", 0.05), ("scale", 0.7)):
            if getattr(block, name) is not None:
                getattr(block, name).fill_(value)
    seen = []
    block.register_forward_hook(lambda mod, inputs, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32))
    assert seen == [torch.bfloat16]

    x = torch.randn(2, 16, 8, 8)

    def scalar(name):
        p = getattr(block, name)
        return 0.0 if p is None else p.item()

    d = x.double()
    w1, w2 = block.conv1.weight.double(), block.conv2.weight.double()
    h = F.relu(F.conv2d(d + scalar("bias1a"), w1, padding=1) + scalar("bias1b"))
    ref = F.relu(scalar("scale") * F.conv2d(h + scalar("bias2a"), w2, padding=1)
                 + scalar("bias2b") + d)
    torch.testing.assert_close(block(x).double(), ref, rtol=1e-5, atol=1e-5)
