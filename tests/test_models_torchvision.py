"""`--model torchvision:NAME`: every family bnlab accepts, with its BatchNorms swapped, against
torchvision's own model; the refused families and their reasons checked on the models."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnlab.cli import main
from bnlab.config import RunConfig, from_mapping
from bnlab.data.synthetic import make_synthetic
from bnlab.errors import UserError
from bnlab.infer.fold import PARITY_LIMIT, fold_model
from bnlab.models import MODELS, build_for, build_model, count_parameters
from bnlab.models.torchvision_swap import FAMILIES, classification_models, family_of, swap_norms
from bnlab.norm import is_norm_layer, make_norm
from bnlab.train.probes import default_layers

pytestmark = pytest.mark.usefixtures("one_thread")

HEAVY = {"wide_resnet", "vgg_bn"}  # over 60M parameters: seconds to build on a shared CPU
SWAPPED = [f for f in FAMILIES if not f.refused and f.has_bn]


def _families(fams):
    return [pytest.param(f, id=f.name, marks=[pytest.mark.slow] if f.name in HEAVY else [])
            for f in fams]


def size_of(family) -> int:
    return 75 if family.name == "inception_v3" else 32  # Inception-v3 needs 75 px at least


def torchvision_model(family, classes=10):
    return torchvision.models.get_model(family.example, weights=None, num_classes=classes,
                                        **dict(family.kwargs))


def one_step(model, size, channels=3):
    """One SGD step on a random batch; the loss and the largest parameter change."""
    torch.manual_seed(0)
    x, y = torch.randn(4, channels, size, size), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    return float(loss.detach()), moved


def feeds_a_batchnorm(node, modules, depth=0) -> bool:
    """node reaches a BatchNorm only through concatenation and pooling (DenseNet)."""
    if depth > 4:
        return False
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.BatchNorm2d):
            return True
        if not isinstance(m, nn.AvgPool2d):
            return False
    elif not (node.op == "call_function" and getattr(node.target, "__name__", "") == "cat"):
        return False
    return all(feeds_a_batchnorm(u, modules, depth + 1) for u in node.users)


def test_families_cover_torchvision_without_overlap():
    names = classification_models()
    for name in names:
        matching = [f.name for f in FAMILIES if __import__("re").fullmatch(f.pattern, name)]
        assert len(matching) <= 1, (name, matching)
    for f in FAMILIES:
        assert f.example in names and family_of(f.example) is f


@pytest.mark.parametrize("family", _families(SWAPPED))
def test_norm_bn_is_torchvisions_own_model(family):
    ref = torchvision_model(family)
    ours = build_model(f"torchvision:{family.example}", 10, norm="bn")
    assert count_parameters(ours) == count_parameters(ref)
    ref_bn = [(m.eps, m.momentum) for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    our_bn = [(m.eps, m.momentum) for m in ours.modules() if isinstance(m, nn.BatchNorm2d)]
    assert our_bn == ref_bn and len(ref_bn) > 0
    assert {n: p.shape for n, p in ours.net.named_parameters()} == \
        {n: p.shape for n, p in ref.named_parameters()}


@pytest.mark.parametrize("family", _families(SWAPPED))
def test_swapped_model_has_no_batchnorm_and_trains_a_step(family):
    size = size_of(family)
    ref = torchvision_model(family)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    # the claim behind the bias rule: every conv built without a bias feeds a BatchNorm
    modules = dict(ref.named_modules())
    for node in torch.fx.symbolic_trace(ref).graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Conv2d) \
                and modules[node.target].bias is None:
            assert all(feeds_a_batchnorm(u, modules) for u in node.users), node.target
    for norm, layer in (("group", nn.GroupNorm), ("none", None)):
        model = build_model(f"torchvision:{family.example}", 10, norm=norm, in_channels=1)
        assert not any(isinstance(m, _BatchNorm) for m in model.modules())
        if layer is None:
            assert not any(is_norm_layer(m) for m in model.modules())
            assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
        else:
            assert sum(isinstance(m, layer) for m in model.modules()) == n_bn
        loss, moved = one_step(model, size, channels=1)
        assert loss == loss and moved > 0
    names = model.block_names()
    assert bool(names) == bool(family.blocks)  # VGG-BN: conv layers only, no blocks
    assert all(type(model.get_submodule(n)).__name__ in family.blocks for n in names)


def test_block_names_are_probe_outputs_with_and_without_norm():
    layers = {}
    for norm in ("bn", "none"):
        cfg = from_mapping(dict(model="torchvision:mobilenet_v2", norm=norm, probe_every=1))
        layers[norm] = default_layers(cfg, build_model(cfg.model, 10, norm=norm))
    assert layers["bn"] == layers["none"]
    assert sum(w == "output" for _, _, w in layers["bn"]) == 17  # its 17 inverted residuals
    assert sum(w == "input" for _, _, w in layers["bn"]) == 52  # its 52 BatchNorms


def test_regnet_norm_positions_are_found_on_the_meta_device():
    # RegNet computes its widths with tensor ops that the meta device cannot run
    cfg = from_mapping(dict(model="torchvision:regnet_x_400mf", norm="none", probe_every=1))
    layers = default_layers(cfg, build_model(cfg.model, 10, norm="none"))
    assert sum(w == "input" for _, _, w in layers) == 1 + 3 * 22 + 4  # stem, blocks, projections


def test_carried_eps_and_momentum_give_way_to_the_users_options():
    bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.01)
    assert (swap_norms(bn, "bn").eps, swap_norms(bn, "bn").momentum) == (1e-3, 0.01)
    new = swap_norms(nn.Sequential(bn), "ghost", {"momentum": 0.2})[0]
    assert (new.eps, new.momentum) == (1e-3, 0.2)
    keras = swap_norms(nn.BatchNorm2d(8, eps=1e-4, momentum=0.3), "bn", {"convention": "keras"})
    own = make_norm("bn", 8, convention="keras")  # the Keras convention's own values
    assert (keras.eps, keras.momentum) == (own.eps, own.momentum)
    assert isinstance(swap_norms(bn, "layer"), nn.GroupNorm) and swap_norms(bn, "layer").eps == 1e-3


@pytest.mark.parametrize("family", _families([f for f in FAMILIES if f.refused]))
def test_refused_families_name_their_reason_and_it_holds(family):
    with torch.device("meta"):
        with pytest.raises(UserError, match=f"torchvision:{family.example} is refused: .*"
                                            "LayerNorm"):
            build_model(f"torchvision:{family.example}", 10, norm="bn")
        ref = torchvision_model(family)
    assert any(isinstance(m, nn.LayerNorm) or type(m).__name__ == "LayerNorm2d"
               for m in ref.modules())


def test_models_without_norms_take_norm_none_only():
    family = next(f for f in FAMILIES if f.name == "no_norm")
    with pytest.raises(UserError, match="squeezenet1_1 has no BatchNorm.*norm none only"):
        build_model("torchvision:squeezenet1_1", 10, norm="bn")
    model = build_model("torchvision:squeezenet1_1", 10, norm="none")
    assert not any(is_norm_layer(m) for m in model.modules())
    loss, moved = one_step(model, 32)
    assert loss == loss and moved > 0
    assert count_parameters(model) == count_parameters(torchvision_model(family))


def test_unknown_and_untested_names_are_refused():
    with pytest.raises(UserError, match="unknown torchvision .*'resnet35'.*did you mean"):
        build_model("torchvision:resnet35", 10)
    assert "torchvision:resnet34" in MODELS and "torchvision:resnet35" not in MODELS


def test_images_a_model_cannot_take_and_degenerate_norms_are_refused_for_the_run():
    small = make_synthetic(n_train=4, n_test=4, size=32)
    cfg = RunConfig(dataset="synthetic", model="torchvision:alexnet", norm="none")
    with pytest.raises(UserError, match="alexnet cannot take 32 px images"):
        build_for(cfg, small)
    cfg = RunConfig(dataset="synthetic", model="torchvision:resnet18", norm="instance")
    with pytest.raises(UserError, match="single values at net.layer4.0.bn1 .* 32 px"):
        build_for(cfg, small)
    # 64 px leaves layer4 2x2 maps: instance norm has 4 values per channel there
    assert build_for(cfg, make_synthetic(n_train=4, n_test=4, size=64)) is not None
    cfg = RunConfig(dataset="synthetic", model="torchvision:mobilenet_v3_small", norm="group")
    assert build_for(cfg, small) is not None


@pytest.mark.parametrize("name,count", [
    ("mobilenet_v2", 52), ("efficientnet_b0", 49), ("regnet_x_400mf", 71),
    ("shufflenet_v2_x0_5", 56), ("resnet34", 36),
    ("densenet121", 59)])  # pre-activation: norm0 and each layer's norm2 follow a conv
def test_fold_parity(name, count):
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", 10, norm="bn")
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    model.eval()
    folded, info = fold_model(model)
    assert len(info["folded"]) == count
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), folded(x)
    assert float((a - b).abs().max() / a.abs().max()) <= PARITY_LIMIT


def test_fixup_takes_the_resnet_families_only():
    model = build_model("torchvision:resnext50_32x4d", 10, norm="none", init="fixup")
    assert float(model.classifier.weight.abs().sum()) == 0
    with pytest.raises(UserError, match="fixup.*not for torchvision:mobilenet_v2"):
        build_model("torchvision:mobilenet_v2", 10, norm="none", init="fixup")


def test_run_ids_have_no_colon_and_the_listing_names_every_family(capsys):
    cfg = RunConfig(model="torchvision:mobilenet_v2")
    assert cfg.run_id().startswith("torchvision-mobilenet_v2-bn-cifar10-s0-")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "plain56" in out and "vgg16" in out
    for f in FAMILIES:
        assert f"  {f.name} " in out and f.example in out
