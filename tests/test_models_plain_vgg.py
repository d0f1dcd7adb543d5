"""Plain CIFAR nets (ResNets without shortcuts) and CIFAR VGGs: sizes against closed forms,
their placements computed by hand, init refusals, folding, packing and probe positions."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_stats, step_packed_and_lone
from torch import nn

from bnlab.config import RunConfig, from_mapping
from bnlab.data.synthetic import make_synthetic
from bnlab.errors import UserError
from bnlab.infer.fold import PARITY_LIMIT, fold_model
from bnlab.models import build_for, build_model, count_parameters
from bnlab.models.grouped import owned_entries, pack_models, unpack_state
from bnlab.models.names import PLAIN_DEPTHS
from bnlab.models.names import VGG_CONFIGS as CONFIGS
from bnlab.norm import NORMS, is_norm_layer
from bnlab.train.packed import can_pack
from bnlab.train.probes import default_layers

pytestmark = pytest.mark.usefixtures("one_thread")

VGG_CHANNELS = {  # Simonyan & Zisserman 2015, Table 1, configurations A, B, D, E (convs only)
    "vgg11": [64, 128, 256, 256, 512, 512, 512, 512],
    "vgg13": [64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
    "vgg19": [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512],
}


def resnet_option_a_count(depth: int, classes: int, bn: bool) -> int:
    """He et al.'s CIFAR ResNet-(6n+2) with parameter-free (option A) shortcuts: 3x3 convs
    without bias, 2 parameters per channel of each of the 6n+1 norms (1 bias without them),
    fc 64 -> classes."""
    n = (depth - 2) // 6
    convs = 9 * (3 * 16 + (2 * n) * 16 * 16 + 16 * 32 + (2 * n - 1) * 32 * 32 + 32 * 64
                 + (2 * n - 1) * 64 * 64)
    channels = 16 + 2 * n * (16 + 32 + 64)
    return convs + channels * (2 if bn else 1) + 64 * classes + classes


def vgg_count(arch: str, classes: int, bn: bool, in_channels: int = 3) -> int:
    ch = VGG_CHANNELS[arch]
    convs = 9 * sum(a * b for a, b in zip([in_channels] + ch[:-1], ch))
    return convs + sum(ch) * (2 if bn else 1) + 512 * classes + classes


@pytest.mark.parametrize("name", sorted(PLAIN_DEPTHS))
def test_plain_nets_have_the_parameters_of_their_option_a_resnets(name):
    depth = PLAIN_DEPTHS[name]
    for bn in (True, False):
        norm = "bn" if bn else "none"
        want = resnet_option_a_count(depth, 10, bn)
        assert count_parameters(build_model(name, 10, norm=norm)) == want
        assert count_parameters(build_model(f"resnet{depth}", 10, norm=norm)) == want
    assert resnet_option_a_count(20, 10, True) == 269_722  # He et al. 2016, Table 6: 0.27M
    assert round(resnet_option_a_count(56, 10, True) / 1e6, 2) == 0.85  # Table 6: 0.85M


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_vgg_parameter_counts_match_closed_form(arch):
    for bn in (True, False):
        model = build_model(arch, 10, norm="bn" if bn else "none")
        assert count_parameters(model) == vgg_count(arch, 10, bn)
    assert count_parameters(build_model(arch, 100, norm="bn", in_channels=1)) == \
        vgg_count(arch, 100, True, in_channels=1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == VGG_CHANNELS[arch]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)


def test_vgg16_size_is_the_common_cifar_figure_without_the_redundant_conv_biases():
    # kuangliu/pytorch-cifar's VGG16 (conv biases kept next to BN) has 14,728,266 parameters;
    # bnlab drops the 4,224 conv biases a BN shift makes redundant
    assert count_parameters(build_model("vgg16", 10)) == 14_728_266 - 4_224


def test_plain_block_is_the_residual_branch_alone():
    torch.manual_seed(0)
    res = build_model("resnet20", 10, norm="bn").eval()
    plain = build_model("plain20", 10, norm="bn").eval()
    plain.load_state_dict(res.state_dict())
    x = torch.randn(2, 16, 32, 32)
    for i in (0, 3, 6):  # an identity block and the two downsampling ones
        rb, pb = res.blocks[i], plain.blocks[i]
        with torch.no_grad():
            branch = rb.n2(rb.conv2(F.relu(rb.n1(rb.conv1(x)))))
            torch.testing.assert_close(pb(x), F.relu(branch))
            torch.testing.assert_close(rb(x), F.relu(branch + rb.shortcut(x)))
            x = rb(x)
    assert all(b.shortcut is None for b in plain.blocks)
    assert plain.arch == "plain20" and plain(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_plain_post_act_block_by_hand():
    torch.manual_seed(0)
    net = build_model("plain20", 10, norm="bn", placement="post_act")
    b = net.blocks[3]
    x = torch.randn(4, 16, 16, 16)
    want = b.n2(F.relu(b.conv2(b.n1(F.relu(b.conv1(x))))))
    torch.testing.assert_close(b(x), want)


@pytest.mark.parametrize("placement", ["post_conv", "post_act"])
def test_vgg_units_by_hand(placement):
    torch.manual_seed(0)
    net = build_model("vgg11", 10, norm="bn", placement=placement)
    x = torch.randn(2, 3, 32, 32)
    h = x
    for m in net.features:
        if isinstance(m, nn.MaxPool2d):
            h = F.max_pool2d(h, 2, 2)
        elif placement == "post_conv":
            h = F.relu(m.norm(m.conv(h)))
        else:
            h = m.norm(F.relu(m.conv(h)))
    want = net.fc(h.flatten(1))  # 1x1 after five pools
    torch.testing.assert_close(net(x), want)


@pytest.mark.parametrize("name,k", [("vgg16", 0), ("vgg16", 4), ("vgg16", 13), ("plain20", 3)])
def test_first_k_keeps_the_first_norms_only(name, k):
    net = build_model(name, 10, norm="bn", placement="first_k", first_k=k)
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    # VGG: the first k conv layers; plain: the stem's norm and the 2 of each of k blocks
    assert len(norms) == (k if name.startswith("vgg") else 1 + 2 * k)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.bias is None for c in convs] == [i < len(norms) for i in range(len(convs))]


def test_out_of_range_first_k_and_small_images_are_refused():
    with pytest.raises(UserError, match="between 0 and 13"):
        build_model("vgg16", 10, placement="first_k", first_k=14)
    with pytest.raises(UserError, match="between 0 and 27.*plain56"):
        build_model("plain56", 10, placement="first_k", first_k=28)
    with pytest.raises(UserError, match="at least 32 px, got 28"):
        build_model("vgg11", 10, in_channels=1, image_size=28)
    # larger images are averaged after the last pool
    assert build_model("vgg11", 10, image_size=64)(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("name", ["plain20", "vgg11"])
@pytest.mark.parametrize("init", ["fixup", "zero_residual", "skipinit"])
def test_residual_inits_are_refused_with_their_reason(name, init):
    for norm in ("bn", "none"):
        with pytest.raises(UserError, match=f"init '{init}'.*{name} has none.*no shortcuts"):
            build_model(name, 10, norm=norm, init=init)


@pytest.mark.parametrize("name", ["plain20", "vgg11"])
@pytest.mark.parametrize("placement", ["post_conv", "post_act", "first_k"])
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_and_placement_builds_and_trains(name, placement, norm):
    torch.manual_seed(0)
    net = build_model(name, 10, norm=norm, placement=placement, first_k=2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(net(x), y).backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert float(net.classifier.weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["plain20", "vgg11"])
@pytest.mark.parametrize("init", ["kaiming", "xavier", "orthogonal"])
def test_every_general_init_applies(name, init):
    torch.manual_seed(0)
    net = build_model(name, 10, norm="none", init=init)
    w = net.classifier.weight.detach()
    if init == "orthogonal":  # rows of a (10, 512) orthogonal matrix: orthonormal
        torch.testing.assert_close(w @ w.T, torch.eye(10), atol=1e-5, rtol=0)
    else:  # kaiming: var 2 / fan_in; xavier (uniform): var 2 / (fan_in + fan_out)
        conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d)
                    and m.weight.numel() > 20_000)
        fan_in, fan_out = conv.weight[0].numel(), conv.weight.shape[0] * 9
        want = 2 / fan_in if init == "kaiming" else 2 / (fan_in + fan_out)
        assert abs(float(conv.weight.detach().var()) / want - 1) < 0.05
    assert all(float(m.bias.detach().abs().sum()) == 0 for m in net.modules()
               if isinstance(m, nn.Conv2d) and m.bias is not None)


# -- fold, packing, probes ---------------------------------------------------------------------
@pytest.mark.parametrize("name,placement,count", [
    ("plain20", "post_conv", 19), ("vgg11", "post_conv", 8), ("vgg16", "first_k", 4),
    ("vgg11", "post_act", 0), ("plain20", "post_act", 0)])
def test_fold_parity(name, placement, count):
    torch.manual_seed(0)
    model = randomize_stats(build_model(name, 10, norm="bn", placement=placement, first_k=4))
    folded, info = fold_model(model)
    assert len(info["folded"]) == count
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(info["left"]) == norms - count
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), folded(x)
    assert float((a - b).abs().max() / a.abs().max()) <= PARITY_LIMIT


@pytest.mark.parametrize("name", ["plain20", pytest.param("vgg11", marks=pytest.mark.slow)])
def test_packed_steps_equal_lone_steps_float64(name):
    """Two runs (BN, none) as one grouped network against two lone runs, 2 SGD steps."""
    base = RunConfig(dataset="synthetic", model=name, epochs=1, batch_size=4, device="cpu")
    cfgs = [dataclasses.replace(base, norm=n, seed=s, lr=lr)
            for n, s, lr in (("bn", 0, 0.05), ("none", 1, 0.02))]
    assert can_pack(cfgs) is None
    bundle = make_synthetic(n_train=8, n_test=8, size=32)
    models = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        models.append(build_for(c, bundle).double())
    packed = pack_models(models)
    owned = owned_entries(models, packed)
    step_packed_and_lone(packed, models, cfgs, owned, steps=2, batch=2, size=32)
    state = packed.state_dict()
    for i, m in enumerate(models):
        mine = unpack_state(state, i, 2, m.state_dict())
        for key, ref in m.state_dict().items():
            if ref.is_floating_point():
                err = float((mine[key] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                assert err < 1e-10, (key, err)


def test_vgg_and_plain_packs_are_accepted_and_torchvision_ones_refused():
    base = RunConfig(dataset="synthetic", epochs=1, batch_size=4, device="cpu")
    for name in ("vgg16", "plain56"):
        cfgs = [dataclasses.replace(base, model=name, norm=n, seed=s)
                for n, s in (("bn", 0), ("none", 1), ("bn", 2))]
        assert can_pack(cfgs) is None
    cfgs = [dataclasses.replace(base, model="torchvision:mobilenet_v2", seed=s) for s in (0, 1)]
    assert "not packable" in can_pack(cfgs)


@pytest.mark.parametrize("name,blocks,norms", [("plain20", 9, 19), ("vgg16", 13, 13)])
def test_probe_positions_are_the_same_with_and_without_norm(name, blocks, norms):
    layers = {}
    for norm in ("bn", "none"):
        cfg = from_mapping(dict(model=name, norm=norm, probe_every=1))
        layers[norm] = default_layers(cfg, build_model(name, 10, norm=norm))
    assert layers["bn"] == layers["none"]
    inputs = [x for x in layers["bn"] if x[2] == "input"]
    outputs = [x for x in layers["bn"] if x[2] == "output"]
    assert len(inputs) == norms and len(outputs) == blocks
    net = build_model(name, 10, norm="bn")
    mods = dict(net.named_modules())
    assert all(is_norm_layer(mods[m]) for _, m, _ in inputs)
