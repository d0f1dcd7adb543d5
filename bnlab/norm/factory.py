"""Normalization layers by name: one factory, `make_norm`, used by every model.

The layers themselves live in bnlab/norm/layers.py, each with its formula in its docstring;
this module maps names and options onto them and answers the questions models and
initializations ask about a norm (does the conv before it need a bias, can its scale be 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bnlab.config import check_options
from bnlab.errors import UserError, unknown
from bnlab.norm import layers as L

# name -> one-line formula (shown by `bnlab norms`); mean_B/var_B: batch mean and biased
# variance per channel, xhat = (x - mean_B) / sqrt(var_B + eps).
FORMULAS: dict[str, str] = {
    "bn": "y = gamma * xhat + beta  (torch.nn.BatchNorm: momentum 0.1, eps 1e-5; "
          "convention=keras: momentum 0.99 kept, eps 1e-3)",
    "bn_ref": "y = gamma * xhat + beta  (from the formulas, hand-written backward)",
    "bn_posscale": "y = softplus(rho) * xhat + beta  (scale kept > 0)",
    "bn_l2": "z = softplus(rho) * xhat + beta;  y = z / sqrt(mean_batch z^2 + eps)  (the "
             "seed study's formula with the sum made a mean: trains)",
    "bn_l2_sum": "z = softplus(rho) * xhat + beta;  y = z / sqrt(sum_batch z^2 + eps)  (the "
                 "seed study's formula as written: output std 1/sqrt(m))",
    "batch_renorm": "y = gamma * (xhat * r + d) + beta,  r, d clipped to rmax, dmax  "
                    "(Ioffe 2017)",
    "cumulative": "y = gamma * (x - mu_t) / sqrt(v_t + eps) + beta,  mu_t, v_t over all "
                  "batches so far",
    "ghost": "y = gamma * xhat_v + beta,  statistics per virtual batch of v examples",
    "frozen": "y = w * (x - mu) / sqrt(v + eps) + b,  all four fixed buffers",
    "group": "y = gamma * (x - mean_G) / sqrt(var_G + eps) + beta,  per sample and group of "
             "channels",
    "layer": "y = gamma * (x - mean_CHW) / sqrt(var_CHW + eps) + beta,  per sample",
    "instance": "y = gamma * (x - mean_HW) / sqrt(var_HW + eps) + beta,  per sample and "
                "channel",
    "none": "y = x  (identity; the conv/linear before it gets a bias)",
}

# name -> accepted options with their defaults (None = the layer's own default)
OPTIONS: dict[str, dict] = {
    "bn": {"momentum": None, "eps": None, "affine": True, "convention": "torch"},
    "bn_ref": {"momentum": 0.1, "eps": 1e-5, "affine": True},
    "bn_posscale": {"momentum": 0.1, "eps": 1e-5},
    "bn_l2": {"momentum": 0.1, "eps": 1e-5},
    "bn_l2_sum": {"momentum": 0.1, "eps": 1e-5},
    "batch_renorm": {"momentum": 0.1, "eps": 1e-5, "affine": True, "rmax": 3.0, "dmax": 5.0,
                     "warmup_steps": 5000, "rmax_ramp_steps": 35000,
                     "dmax_ramp_steps": 20000},
    "cumulative": {"eps": 1e-5, "affine": True},
    "ghost": {"virtual_batch_size": 32, "momentum": 0.1, "eps": 1e-5, "affine": True},
    "frozen": {"eps": 1e-5},
    "group": {"groups": 8, "eps": 1e-5, "affine": True},
    "layer": {"eps": 1e-5, "affine": True},
    "instance": {"eps": 1e-5, "affine": True},
    "none": {},
}
NORMS = tuple(FORMULAS)

# Norms that subtract a per-channel mean: a per-channel constant added before them (a conv
# bias) is removed exactly, so they never get a bias substitute, even with affine=False.
_CANCELS_CHANNEL_SHIFT = {"bn", "bn_ref", "bn_posscale", "bn_l2", "bn_l2_sum", "batch_renorm",
                          "ghost", "instance"}


def _options(name: str, options: dict) -> dict:
    accepted = OPTIONS[name]
    check_options(f"norm {name!r}", options, accepted)  # known, each of its type
    out = {**accepted, **options}
    for key in ("momentum",):
        if out.get(key) is not None and not 0.0 <= float(out[key]) <= 1.0:
            raise UserError(f"norm option momentum must be in [0, 1], got {out[key]!r}")
    if "eps" in out and out["eps"] is not None and not float(out["eps"]) > 0:
        raise UserError(f"norm option eps must be > 0, got {out['eps']!r}")
    for key in ("virtual_batch_size", "groups"):
        if key in out and not (isinstance(out[key], int) and out[key] >= 1):
            raise UserError(f"norm option {key} must be an integer >= 1, got {out[key]!r}")
    if name == "batch_renorm" and not (out["rmax"] >= 1 and out["dmax"] >= 0):
        raise UserError(f"batch_renorm needs rmax >= 1 and dmax >= 0, got rmax {out['rmax']!r}"
                        f", dmax {out['dmax']!r}")
    for key in ("warmup_steps", "rmax_ramp_steps", "dmax_ramp_steps"):
        if name == "batch_renorm" and out[key] < 0:
            raise UserError(f"norm option {key} must be an integer >= 0, got {out[key]!r}")
    return out


def make_norm(name: str, num_features: int, dim: int = 2, **options) -> nn.Module:
    """A normalization layer over `num_features` channels of a `dim`-d input.

    dim=2: inputs (N, C, H, W); dim=1: inputs (N, C) (or (N, C, L)). `options` are the norm's
    own (OPTIONS[name]); an unknown name or option is a UserError.
    """
    if name not in FORMULAS:
        raise unknown("norm", name, FORMULAS)
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 or 2, got {dim}")
    o = _options(name, options)
    c = num_features
    if name == "none":
        return nn.Identity()
    if name == "bn":
        if o["convention"] == "keras":
            return L.KerasBatchNorm(c, 0.99 if o["momentum"] is None else o["momentum"],
                                    1e-3 if o["eps"] is None else o["eps"], o["affine"])
        if o["convention"] != "torch":
            raise UserError(f"norm option convention must be torch or keras, got "
                            f"{o['convention']!r}")
        cls = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        return cls(c, eps=1e-5 if o["eps"] is None else o["eps"],
                   momentum=0.1 if o["momentum"] is None else o["momentum"], affine=o["affine"])
    if name == "bn_ref":
        return L.ReferenceBatchNorm(c, o["eps"], o["momentum"], o["affine"], True)
    if name == "bn_posscale":
        return L.PositiveScaleBatchNorm(c, o["momentum"], o["eps"])
    if name in ("bn_l2", "bn_l2_sum"):
        return L.L2BatchNorm(c, o["momentum"], o["eps"], "sum" if name == "bn_l2_sum" else "mean")
    if name == "batch_renorm":
        return L.BatchRenorm(c, **o)
    if name == "cumulative":
        return L.CumulativeNorm(c, o["eps"], o["affine"])
    if name == "ghost":
        if dim == 1 and o["virtual_batch_size"] < 2:
            # on (N, C) features a virtual batch of one example holds one value per channel:
            # no variance, so every training step would fail (on images one example still
            # has H*W values per channel, so 1 is accepted there)
            raise UserError("norm 'ghost' on (N, C) features needs virtual_batch_size >= 2: "
                            "a virtual batch of 1 example has a single value per channel, got "
                            f"{o['virtual_batch_size']}")
        return L.GhostBatchNorm(c, **o)
    if name == "frozen":
        return L.FrozenBatchNorm(c, o["eps"])
    if name == "instance" and dim == 1:
        raise UserError("norm 'instance' needs spatial positions: on (N, C) features it would "
                        "normalize single values (output = beta); use layer or group")
    # groups = gcd(requested, C) so that it divides C. The default is 8, not Wu & He's 32: with
    # 32, every group of a CIFAR ResNet's 16- and 32-channel stages would hold one channel
    # (instance norm).
    groups = {"group": math.gcd(o.get("groups", 1), c), "layer": 1, "instance": c}[name]
    return L.GroupNorm(groups, c, o["eps"], o["affine"])


def has_bias_substitute(name: str, options: dict | None = None) -> bool:
    """True when the conv/linear before this norm should carry its own bias.

    That is the case when the norm adds no learnable shift and would not cancel the bias:
    `none`, `frozen` (its shift is a fixed buffer), and `group`/`layer`/`cumulative` with
    affine=False (they do not subtract a per-channel batch mean, so a bias survives them).
    Every other norm subtracts each channel's mean, which removes a conv bias exactly, and
    has its own beta (or, with affine=False, no shift at all that a bias could provide).
    """
    if name in ("none", "frozen"):
        return True
    affine = (options or {}).get("affine", True)
    return not affine and name not in _CANCELS_CHANNEL_SHIFT


def zero_scale_refusal(name: str, options: dict | None = None) -> str | None:
    """Why this norm's output cannot be made 0 by a scale of 0 (None when it can)."""
    if name == "none":
        return "norm 'none' has no scale to set to 0"
    if name == "frozen":
        return "norm 'frozen' has a fixed (not learnable) scale, so a 0 would never recover"
    if name in ("bn_posscale", "bn_l2", "bn_l2_sum"):
        return f"norm {name!r} keeps its scale > 0 by construction"
    if not (options or {}).get("affine", True):
        return f"norm {name!r} with affine=false has no scale"
    return None


def zero_scale_(module: nn.Module) -> None:
    """Set the scale (gamma) of a norm layer built by make_norm to 0 in place."""
    with torch.no_grad():
        module.weight.zero_()


def is_norm_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm
                      | L.PositiveScaleBatchNorm | L.L2BatchNorm | L.FrozenBatchNorm)
