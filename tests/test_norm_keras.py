"""bn with convention="keras" against keras.layers.BatchNormalization (Keras 3, torch backend)."""

from __future__ import annotations

import os

import pytest
import torch

from bnlab.norm import make_norm

os.environ.setdefault("KERAS_BACKEND", "torch")
try:
    import keras
except ImportError:  # keras is a test-only dependency
    keras = None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def keras_parity_errors(dim: int, batches: int = 5, momentum: float = 0.99) -> dict[str, float]:
    """Max relative errors between bnlab's Keras-convention bn and Keras's own layer."""
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on the {keras.backend.backend()!r} backend, not torch")
    c = 5
    g = torch.Generator().manual_seed(0)
    ours = make_norm("bn", c, dim=dim, convention="keras", momentum=momentum)
    theirs = keras.layers.BatchNormalization(momentum=momentum)  # axis=-1: channels last
    shape = (8, c, 6, 6) if dim == 2 else (8, c)
    # NCHW for bnlab, NHWC for Keras
    to_keras = (lambda t: t.permute(0, 2, 3, 1)) if dim == 2 else (lambda t: t)
    from_keras = (lambda t: t.permute(0, 3, 1, 2)) if dim == 2 else (lambda t: t)
    theirs.build(to_keras(torch.zeros(shape)).shape)
    gamma, beta = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    theirs.gamma.assign(gamma.numpy())
    theirs.beta.assign(beta.numpy())
    with torch.no_grad():
        ours.weight.copy_(gamma)
        ours.bias.copy_(beta)
    errs = {"train_output": 0.0}
    for _ in range(batches):
        x = torch.randn(shape, generator=g) * 3 + 2
        y_ours = ours.train()(x).detach()
        y_theirs = from_keras(torch.as_tensor(
            keras.ops.convert_to_numpy(theirs(to_keras(x), training=True))))
        errs["train_output"] = max(errs["train_output"], rel_err(y_ours, y_theirs))
    errs["moving_mean"] = rel_err(ours.running_mean,
                                  torch.as_tensor(keras.ops.convert_to_numpy(theirs.moving_mean)))
    errs["moving_var"] = rel_err(
        ours.running_var, torch.as_tensor(keras.ops.convert_to_numpy(theirs.moving_variance)))
    x = torch.randn(shape, generator=g) * 3 + 2
    y_ours = ours.eval()(x).detach()
    y_theirs = from_keras(torch.as_tensor(
        keras.ops.convert_to_numpy(theirs(to_keras(x), training=False))))
    errs["eval_output"] = rel_err(y_ours, y_theirs)
    return errs


@pytest.mark.skipif(keras is None, reason="keras is not installed (test-only dependency)")
@pytest.mark.parametrize("dim", [1, 2])
def test_keras_convention_matches_keras(dim):
    errs = keras_parity_errors(dim)
    assert max(errs.values()) <= 1e-5, errs


def test_keras_convention_maps_momentum_and_eps():
    m = make_norm("bn", 3, convention="keras")
    assert m.eps == 1e-3 and m.keras_momentum == 0.99
    assert m.momentum == pytest.approx(0.01)  # PyTorch's fraction replaced = 1 - kept
    x = torch.randn(4, 3, 2, 2) + 1
    m(x)
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=False)  # Keras moves towards the biased variance
    assert torch.allclose(m.running_mean, 0.01 * mean, atol=1e-6)
    assert torch.allclose(m.running_var, 0.99 + 0.01 * var, atol=1e-6)
