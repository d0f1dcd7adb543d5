"""The `normal` initialization: conv/linear weights ~ N(0, std^2), biases 0, std validated."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab.errors import UserError
from bnlab.models import build_model


@pytest.mark.parametrize("std", [0.01, 0.5])
def test_normal_init_draws_weights_with_the_given_std(std):
    torch.manual_seed(0)
    model = build_model("mlp3x100", 10, norm="none", init="normal", init_options={"std": std},
                        in_channels=1, image_size=28)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(layers) == 4
    w = torch.cat([m.weight.detach().double().flatten() for m in layers])
    # n = 109,400 draws: the sample mean has sd std/sqrt(n), the sample std a relative sd of
    # 1/sqrt(2n) = 0.2%; 5 sds of each
    n = w.numel()
    assert abs(float(w.mean())) < 5 * std / math.sqrt(n)
    assert float(w.std()) == pytest.approx(std, rel=5 / math.sqrt(2 * n))
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in layers if m.bias is not None)


def test_normal_init_on_a_resnet_leaves_norms_at_their_own_init():
    model = build_model("resnet20", 10, norm="bn", init="normal", init_options={"std": 0.1})
    assert float(model.n1.weight.detach().min()) == float(model.n1.weight.detach().max()) == 1.0
    assert float(model.blocks[0].conv1.weight.detach().std()) == pytest.approx(0.1, rel=0.1)


@pytest.mark.parametrize("options,words", [
    ({"std": 0}, "std must be a number > 0"),
    ({"std": -0.1}, "std must be a number > 0"),
    # not a finite number at all: refused by the option types of bnlab.config.check_options
    ({"std": "big"}, "option std must be a finite number"),
    ({"std": True}, "option std must be a finite number"),
    ({"std": float("nan")}, "option std must be a finite number"),
    ({"gain": 1.0}, "unknown option 'gain' for init 'normal'"),
])
def test_normal_init_refuses_bad_options(options, words):
    with pytest.raises(UserError, match=words):
        build_model("mlp3x100", 10, norm="none", init="normal", init_options=options,
                    in_channels=1, image_size=28)


def test_normal_init_from_the_command_line(tmp_path, capsys):
    from bnlab.cli import main

    argv = ["train", "--dataset", "synthetic", "--device", "cpu", "--model", "mlp3x100",
            "--init", "normal", "--init-options", '{"std": -1}', "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "std must be a number > 0, got -1" in err
