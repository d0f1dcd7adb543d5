import pytest
import torch

from bnlab.models import MODELS, build_model, count_parameters
from bnlab.models.names import DEPTHS


def resnet_param_count(depth: int, num_classes: int = 10, bn: bool = True) -> int:
    """Closed form for He et al.'s CIFAR ResNet with option-A shortcuts."""
    n = (depth - 2) // 6
    convs = 3 * 16 * 9  # stem
    channels = [16]
    cin = 16
    for cout in (16, 32, 64):
        for _ in range(n):
            convs += cin * cout * 9 + cout * cout * 9
            channels += [cout, cout]
            cin = cout
    per_channel = 2  # BN: scale and shift; without BN the conv bias takes one per channel
    norm = sum(channels) * (per_channel if bn else 1)
    return convs + norm + 64 * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_cifar_resnet_parameter_counts_match_closed_form(name):
    for bn in (True, False):
        model = build_model(name, 10, norm="bn" if bn else "none")
        assert count_parameters(model) == resnet_param_count(DEPTHS[name], 10, bn)


def test_published_sizes():
    # He et al. 2016, Table 6: ResNet-20 0.27M parameters, ResNet-110 1.7M.
    assert round(count_parameters(build_model("resnet20", 10)) / 1e6, 2) == 0.27
    assert round(count_parameters(build_model("resnet110", 10)) / 1e6, 1) == 1.7
    assert count_parameters(build_model("resnet20", 10)) == 269_722


def test_resnet20_layer_count_and_shapes():
    model = build_model("resnet20", 100)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 20  # 19 convs + 1 fc, no projection shortcuts
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_no_bn_convs_have_bias_bn_convs_do_not():
    for norm, has_bias in (("bn", False), ("none", True)):
        for name in ("resnet20", "resnet18"):
            model = build_model(name, 10, norm=norm)
            convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            assert all((c.bias is not None) == has_bias for c in convs)


def test_option_a_shortcut_has_no_parameters():
    model = build_model("resnet56", 10)
    for block in model.blocks:
        assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.randn(1, 16, 8, 8)
    y = model.blocks[9].shortcut(x)  # first block of stage 2: stride 2, 16 -> 32 channels
    assert y.shape == (1, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_mlp3x100_structure():
    model = build_model("mlp3x100", 10, in_channels=1, image_size=28)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 100), (100, 100), (100, 100), (100, 10)]
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_torchvision_resnets_build_with_norm_choice():
    for name in ("resnet18", "resnet50"):
        model = build_model(name, 7, norm="none")
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert model.classifier.out_features == 7
    m = build_model("resnet18", 10, norm="bn")
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())


def test_every_model_name_builds():
    for name in MODELS:
        if name == "torchvision:NAME":  # stands for the families (tests/test_models_torchvision.py)
            continue
        if name == "entry:MODULE:FUNCTION":  # your own network (tests/test_entry_model.py)
            continue
        kw = {"in_channels": 1, "image_size": 28} if name.startswith("mlp") else {}
        assert count_parameters(build_model(name, 10, **kw)) > 0


@pytest.mark.parametrize("fmt", [torch.channels_last, torch.contiguous_format])
def test_downsampling_shortcut_gives_slice_and_pad_values_in_the_inputs_layout(fmt):
    from bnlab.models.cifar_resnet import ShortcutA

    x = torch.randn(4, 16, 9, 8).contiguous(memory_format=fmt).requires_grad_()
    y = ShortcutA(16, 32, 2)(x)
    want = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    g = torch.randn_like(want)
    (gx,), (g_want,) = torch.autograd.grad(y, x, g), torch.autograd.grad(want, x, g)
    assert type(y.grad_fn).__name__ == "_SubsamplePadBackward"
    assert torch.equal(y, want) and torch.equal(gx, g_want)
    assert y.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("norm,refused", [("bn", True), ("bn_ref", True), ("batch_renorm", True),
                                          ("layer", False), ("none", False)])
def test_batch_of_one_on_the_mlp_is_refused_for_batch_statistics(norm, refused):
    import dataclasses

    from bnlab.config import RunConfig
    from bnlab.data.synthetic import make_synthetic
    from bnlab.errors import UserError
    from bnlab.models.build import build_for

    bundle = make_synthetic(n_train=8, n_test=8)
    cfg = RunConfig(dataset="synthetic", model="mlp3x100", norm=norm, batch_size=1)
    if refused:
        with pytest.raises(UserError, match=f"norm '{norm}' normalizes each feature"):
            build_for(cfg, bundle)
    else:
        model = build_for(cfg, bundle).train()
        model(bundle.train.x[:1].float())  # one example trains
    build_for(dataclasses.replace(cfg, batch_size=2), bundle)  # two examples are enough


@pytest.mark.parametrize("batch,refused", [(3, True), (5, True), (4, False), (1, True)])
def test_ghost_that_would_leave_a_virtual_batch_of_one_on_the_mlp_is_refused(batch, refused):
    from bnlab.config import RunConfig
    from bnlab.data.synthetic import make_synthetic
    from bnlab.errors import UserError
    from bnlab.models.build import build_for

    bundle = make_synthetic(n_train=8, n_test=8)
    cfg = RunConfig(dataset="synthetic", model="mlp3x100", norm="ghost", batch_size=batch,
                    norm_options={"virtual_batch_size": 2})
    if refused:
        with pytest.raises(UserError, match="single example|batch of 1"):
            build_for(cfg, bundle)
    else:
        build_for(cfg, bundle).train()(bundle.train.x[:batch].float())
