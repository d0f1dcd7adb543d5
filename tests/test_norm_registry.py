"""The norm registry (bnlab.norm.REGISTRY): every entry builds, checks its options, and has the
traits its layer shows in behaviour."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from bnlab.errors import UserError
from bnlab.infer.fold import fold_model
from bnlab.models import build_model
from bnlab.models.grouped import NotPackable, check_packable
from bnlab.norm import (
    NORMS,
    OPTIONS,
    REGISTRY,
    make_norm,
    norm_options,
    zero_scale_,
    zero_scale_refusal,
)

C = 16  # channels: 2 per group of `group`'s default 8 groups, so it is not instance norm


def _batch(seed: int, n: int = 8, c: int = C) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, 4, 4, generator=g) * 2 + 1


def _layer(name: str, seed: int = 0) -> nn.Module:
    """A layer with non-trivial affine parameters (a fresh one has scale 1 and shift 0)."""
    torch.manual_seed(seed)
    layer = make_norm(name, C)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def test_the_registry_is_every_norm_and_its_views_agree():
    assert NORMS == tuple(REGISTRY)
    for name, spec in REGISTRY.items():
        assert spec.formula and OPTIONS[name] == {k: o.default for k, o in spec.options.items()}


@pytest.mark.parametrize("name", NORMS)
def test_every_entry_builds_and_checks_its_options(name):
    assert norm_options(name, {}) == OPTIONS[name]
    x = _batch(0)
    layer = make_norm(name, C).train()
    assert layer(x).shape == x.shape
    if name != "instance":  # instance refuses (N, C) features in one line (test_norm.py)
        assert make_norm(name, C, dim=1).train()(x[:, :, 0, 0]).shape == (8, C)
    with pytest.raises(UserError, match=f"unknown option 'nonsense' for norm '{name}'"):
        make_norm(name, C, nonsense=1)
    for key, opt in REGISTRY[name].options.items():
        wrong = "text" if not isinstance(opt.default, str) else 1.5
        with pytest.raises(UserError, match=f"norm '{name}' option {key} must be"):
            make_norm(name, C, **{key: wrong})
        d = opt.default
        tries = (("other",) if isinstance(d, str) else () if isinstance(d, bool)
                 else (-1, 0) if isinstance(d, int) else (-1.0, 0.0, 2.5))
        for bad in tries:  # values of the option's type that it does not accept
            if opt.accepts is not None and not opt.accepts(bad):
                with pytest.raises(UserError, match=re.escape(
                        f"norm option {key} must be {opt.want}, got {bad!r}")):
                    make_norm(name, C, **{key: bad})


@pytest.mark.parametrize("name", NORMS)
def test_batch_stats_is_whether_the_other_examples_change_an_output(name):
    a, b = _layer(name), _layer(name)
    x = _batch(1)
    other = torch.cat([x[:4], _batch(2)[4:] * 3 + 2])
    with torch.no_grad():
        same = torch.allclose(a.train()(x)[:4], b.train()(other)[:4], atol=1e-5)
    assert REGISTRY[name].batch_stats == (not same)


@pytest.mark.parametrize("name", NORMS)
def test_cancels_channel_shift_is_whether_a_per_channel_constant_survives(name):
    """After one earlier batch (so a norm of all batches so far is not this batch's), a
    per-channel constant added to the input changes the training-mode output or not."""
    a, b = _layer(name), _layer(name)
    shift = torch.linspace(-3, 3, C).view(1, C, 1, 1)
    with torch.no_grad():
        a.train()(_batch(3))
        b.train()(_batch(3))
        x = _batch(4)
        same = torch.allclose(a(x), b(x + shift), atol=1e-4)
    assert REGISTRY[name].cancels_channel_shift == same


@pytest.mark.parametrize("name", NORMS)
def test_learned_shift_and_scale_are_the_layers_parameters(name):
    spec, layer = REGISTRY[name], make_norm(name, C)
    assert isinstance(getattr(layer, "bias", None), nn.Parameter) == spec.learned_shift
    refusal = zero_scale_refusal(name)
    assert (refusal is None) == (spec.scale == "learned")
    if refusal is None:  # a zero scale makes the output the shift alone, whatever the input
        zero_scale_(layer)
        with torch.no_grad():
            assert torch.allclose(layer.eval()(_batch(5)), layer(_batch(6)))


@pytest.mark.parametrize("name", NORMS)
def test_foldable_norms_fold_into_the_conv_with_parity_and_others_stay(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 3), _layer(name), nn.ReLU())
    with torch.no_grad():
        for i in range(3):
            model.train()(_batch(10 + i, c=3))
    model.eval()
    folded, info = fold_model(model)
    assert bool(info["folded"]) == REGISTRY[name].foldable
    x = _batch(20, c=3)
    with torch.no_grad():
        a, b = model(x), folded(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max().clamp_min(1)


@pytest.mark.parametrize("name", NORMS)
def test_packable_norms_have_a_packed_form(name):
    for model, size in (("resnet20", 32), ("mlp3x100", 28)):
        try:
            built = build_model(model, 10, norm=name, in_channels=3, image_size=size)
        except UserError:  # instance on the MLP's (N, C) features
            continue
        try:
            check_packable(built)
            packs = True
        except NotPackable:
            packs = False
        assert packs == REGISTRY[name].packable, model
