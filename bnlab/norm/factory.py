"""Normalization layers by name: one registry entry per norm, and the factory `make_norm` that
every model uses.

A `NormSpec` says everything bnlab knows about a norm: how to build it, its formula (shown by
`bnlab norms`), its options with their defaults and accepted values, and its traits (does it
normalize with batch statistics, cancel a per-channel shift, fold into a conv, pack into the
grouped network, what its scale allows). `make_norm`, option validation, `bnlab norms`, packed
training and the questions models and initializations ask about a norm all read `REGISTRY`;
adding a norm is one entry. The layers themselves live in bnlab/norm/layers.py, each with its
formula in its docstring. tests/test_norm_registry.py checks each trait against the layer's
behaviour.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bnlab.errors import UserError, unknown
from bnlab.values import check_options

if TYPE_CHECKING:
    from torch import nn


class _Lazy:
    """A module imported on first use: the registry's names, options and traits are read
    without torch (study specs, estimates, `bnlab study list`); torch and the layers load when
    a norm is first built."""

    def __init__(self, module: str):
        self._module = module

    def __getattr__(self, name: str):
        return getattr(importlib.import_module(self._module), name)


L = _Lazy("bnlab.norm.layers")
_torch_nn = _Lazy("torch.nn")


@dataclass(frozen=True)
class Option:
    """One norm option: its default (its type is the default's, None = the layer's own
    default, a number: bnlab.values.check_options) and the values accepted beyond the type."""

    default: Any
    accepts: Callable[[Any], bool] | None = None
    want: str = ""  # what `accepts` accepts, for the one-line error


MOMENTUM = Option(0.1, lambda v: 0.0 <= float(v) <= 1.0, "in [0, 1]")
EPS = Option(1e-5, lambda v: float(v) > 0, "> 0")
AFFINE = Option(True)
COUNT = Option(1, lambda v: v >= 1, "an integer >= 1")  # a count of examples or groups
STEPS = Option(0, lambda v: v >= 0, "an integer >= 0")


@dataclass(frozen=True)
class NormSpec:
    """A norm: `build(num_features, dim, options)` gets the options checked and completed with
    their defaults; `dim` is 2 for (N, C, H, W) inputs and 1 for (N, C) (or (N, C, L))."""

    formula: str  # one line; mean_B/var_B: batch mean and biased variance per channel
    build: Callable[[int, int, dict], nn.Module]
    options: dict[str, Option] = field(default_factory=dict)
    batch_stats: bool = False  # training-mode output depends on the other examples of the batch
    cancels_channel_shift: bool = False  # subtracts a per-channel mean: a conv bias before it
    #                                      is removed exactly (so it never gets one)
    learned_shift: bool = True  # a learnable shift (beta) where affine: a conv bias is redundant
    scale: str = "learned"  # learned | positive (> 0 by construction) | fixed | none
    foldable: bool = False  # eval mode is the affine map of its running statistics that
    #                         bnlab.infer.fold folds into the conv/linear layer before it
    packable: bool = False  # has a packed form in the grouped network (bnlab.models.grouped)
    check: Callable[[dict], None] | None = None  # a rule across options


def _or(value, default):
    return default if value is None else value


def _bn(c: int, dim: int, o: dict) -> nn.Module:
    if o["convention"] == "keras":
        return L.KerasBatchNorm(c, _or(o["momentum"], 0.99), _or(o["eps"], 1e-3), o["affine"])
    cls = _torch_nn.BatchNorm2d if dim == 2 else _torch_nn.BatchNorm1d
    return cls(c, eps=_or(o["eps"], 1e-5), momentum=_or(o["momentum"], 0.1), affine=o["affine"])


def _ghost(c: int, dim: int, o: dict) -> nn.Module:
    if dim == 1 and o["virtual_batch_size"] < 2:
        # on (N, C) features a virtual batch of one example holds one value per channel: no
        # variance, so every training step would fail (on images one example still has H*W
        # values per channel, so 1 is accepted there)
        raise UserError("norm 'ghost' on (N, C) features needs virtual_batch_size >= 2: "
                        "a virtual batch of 1 example has a single value per channel, got "
                        f"{o['virtual_batch_size']}")
    return L.GhostBatchNorm(c, **o)


def _group(c: int, dim: int, o: dict) -> nn.Module:
    # groups = gcd(requested, C) so that it divides C. The default is 8, not Wu & He's 32: with
    # 32, every group of a CIFAR ResNet's 16- and 32-channel stages would hold one channel
    # (instance norm).
    return L.GroupNorm(math.gcd(o["groups"], c), c, o["eps"], o["affine"])


def _instance(c: int, dim: int, o: dict) -> nn.Module:
    if dim == 1:
        raise UserError("norm 'instance' needs spatial positions: on (N, C) features it would "
                        "normalize single values (output = beta); use layer or group")
    return L.GroupNorm(c, c, o["eps"], o["affine"])


def _renorm_limits(o: dict) -> None:
    if not (o["rmax"] >= 1 and o["dmax"] >= 0):
        raise UserError(f"batch_renorm needs rmax >= 1 and dmax >= 0, got rmax {o['rmax']!r}, "
                        f"dmax {o['dmax']!r}")


_BN_STATS = dict(batch_stats=True, cancels_channel_shift=True)
REGISTRY: dict[str, NormSpec] = {
    "bn": NormSpec(
        "y = gamma * xhat + beta  (torch.nn.BatchNorm: momentum 0.1, eps 1e-5; "
        "convention=keras: momentum 0.99 kept, eps 1e-3)", _bn,
        {"momentum": Option(None, MOMENTUM.accepts, MOMENTUM.want),
         "eps": Option(None, EPS.accepts, EPS.want), "affine": AFFINE,
         "convention": Option("torch", lambda v: v in ("torch", "keras"), "torch or keras")},
        **_BN_STATS, foldable=True, packable=True),
    "bn_ref": NormSpec(
        "y = gamma * xhat + beta  (from the formulas, hand-written backward)",
        lambda c, dim, o: L.ReferenceBatchNorm(c, o["eps"], o["momentum"], o["affine"], True),
        {"momentum": MOMENTUM, "eps": EPS, "affine": AFFINE}, **_BN_STATS, foldable=True),
    "bn_posscale": NormSpec(
        "y = softplus(rho) * xhat + beta  (scale kept > 0)",
        lambda c, dim, o: L.PositiveScaleBatchNorm(c, o["momentum"], o["eps"]),
        {"momentum": MOMENTUM, "eps": EPS}, **_BN_STATS, scale="positive"),
    # bn_posscale's scale is softplus(rho), not a `weight`, and both L2 forms divide by a
    # running denominator in eval mode: folding takes neither
    "bn_l2": NormSpec(
        "z = softplus(rho) * xhat + beta;  y = z / sqrt(mean_batch z^2 + eps)  (the seed "
        "study's formula with the sum made a mean: trains)",
        lambda c, dim, o: L.L2BatchNorm(c, o["momentum"], o["eps"], "mean"),
        {"momentum": MOMENTUM, "eps": EPS}, **_BN_STATS, scale="positive"),
    "bn_l2_sum": NormSpec(
        "z = softplus(rho) * xhat + beta;  y = z / sqrt(sum_batch z^2 + eps)  (the seed "
        "study's formula as written: output std 1/sqrt(m))",
        lambda c, dim, o: L.L2BatchNorm(c, o["momentum"], o["eps"], "sum"),
        {"momentum": MOMENTUM, "eps": EPS}, **_BN_STATS, scale="positive"),
    "batch_renorm": NormSpec(
        "y = gamma * (xhat * r + d) + beta,  r, d clipped to rmax, dmax  (Ioffe 2017)",
        lambda c, dim, o: L.BatchRenorm(c, **o),
        {"momentum": MOMENTUM, "eps": EPS, "affine": AFFINE, "rmax": Option(3.0),
         "dmax": Option(5.0), "warmup_steps": Option(5000, STEPS.accepts, STEPS.want),
         "rmax_ramp_steps": Option(35000, STEPS.accepts, STEPS.want),
         "dmax_ramp_steps": Option(20000, STEPS.accepts, STEPS.want)},
        **_BN_STATS, foldable=True, check=_renorm_limits),
    # the mean of all batches so far is not this batch's: a shift of this batch survives
    "cumulative": NormSpec(
        "y = gamma * (x - mu_t) / sqrt(v_t + eps) + beta,  mu_t, v_t over all batches so far",
        lambda c, dim, o: L.CumulativeNorm(c, o["eps"], o["affine"]),
        {"eps": EPS, "affine": AFFINE}, batch_stats=True, foldable=True),
    "ghost": NormSpec(
        "y = gamma * xhat_v + beta,  statistics per virtual batch of v examples", _ghost,
        {"virtual_batch_size": Option(32, COUNT.accepts, COUNT.want), "momentum": MOMENTUM,
         "eps": EPS, "affine": AFFINE}, **_BN_STATS, foldable=True),
    "frozen": NormSpec(
        "y = w * (x - mu) / sqrt(v + eps) + b,  all four fixed buffers",
        lambda c, dim, o: L.FrozenBatchNorm(c, o["eps"]), {"eps": EPS},
        learned_shift=False, scale="fixed", foldable=True),
    "group": NormSpec(
        "y = gamma * (x - mean_G) / sqrt(var_G + eps) + beta,  per sample and group of "
        "channels", _group,
        {"groups": Option(8, COUNT.accepts, COUNT.want), "eps": EPS, "affine": AFFINE}),
    "layer": NormSpec(
        "y = gamma * (x - mean_CHW) / sqrt(var_CHW + eps) + beta,  per sample",
        lambda c, dim, o: L.GroupNorm(1, c, o["eps"], o["affine"]),
        {"eps": EPS, "affine": AFFINE}),
    "instance": NormSpec(
        "y = gamma * (x - mean_HW) / sqrt(var_HW + eps) + beta,  per sample and channel",
        _instance, {"eps": EPS, "affine": AFFINE}, cancels_channel_shift=True),
    "none": NormSpec(
        "y = x  (identity; the conv/linear before it gets a bias)",
        lambda c, dim, o: _torch_nn.Identity(), learned_shift=False, scale="none", packable=True),
}
NORMS = tuple(REGISTRY)
# views of the registry for the command line and the study specs
FORMULAS: dict[str, str] = {name: s.formula for name, s in REGISTRY.items()}
OPTIONS: dict[str, dict] = {name: {k: o.default for k, o in s.options.items()}
                            for name, s in REGISTRY.items()}
PACKABLE_NORMS = tuple(name for name, s in REGISTRY.items() if s.packable)


def norm_spec(name: str) -> NormSpec:
    """The registry entry of `name`; an unknown name is a UserError naming the accepted ones."""
    if name not in REGISTRY:
        raise unknown("norm", name, REGISTRY)
    return REGISTRY[name]


def norm_options(name: str, options: dict) -> dict:
    """`options` of norm `name` checked (known, each of its type and accepted values) and
    completed with the defaults."""
    spec = norm_spec(name)
    check_options(f"norm {name!r}", options, OPTIONS[name])
    out = {**OPTIONS[name], **options}
    for key, opt in spec.options.items():
        if opt.accepts is not None and out[key] is not None and not opt.accepts(out[key]):
            raise UserError(f"norm option {key} must be {opt.want}, got {out[key]!r}")
    if spec.check is not None:
        spec.check(out)
    return out


def make_norm(name: str, num_features: int, dim: int = 2, **options) -> nn.Module:
    """A normalization layer over `num_features` channels of a `dim`-d input.

    dim=2: inputs (N, C, H, W); dim=1: inputs (N, C) (or (N, C, L)). `options` are the norm's
    own (REGISTRY[name].options); an unknown name or option is a UserError.
    """
    spec = norm_spec(name)
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 or 2, got {dim}")
    return spec.build(num_features, dim, norm_options(name, options))


def has_bias_substitute(name: str, options: dict | None = None) -> bool:
    """True when the conv/linear before this norm should carry its own bias.

    That is the case when the norm adds no learnable shift and would not cancel the bias:
    `none`, `frozen` (its shift is a fixed buffer), and `group`/`layer`/`cumulative` with
    affine=False (they do not subtract a per-channel batch mean, so a bias survives them).
    Every other norm subtracts each channel's mean, which removes a conv bias exactly, and
    has its own beta (or, with affine=False, no shift at all that a bias could provide).
    """
    spec = norm_spec(name)
    if spec.cancels_channel_shift:
        return False
    return not spec.learned_shift or not (options or {}).get("affine", True)


def zero_scale_refusal(name: str, options: dict | None = None) -> str | None:
    """Why this norm's output cannot be made 0 by a scale of 0 (None when it can)."""
    scale = norm_spec(name).scale
    if scale == "none":
        return f"norm {name!r} has no scale to set to 0"
    if scale == "fixed":
        return f"norm {name!r} has a fixed (not learnable) scale, so a 0 would never recover"
    if scale == "positive":
        return f"norm {name!r} keeps its scale > 0 by construction"
    if not (options or {}).get("affine", True):
        return f"norm {name!r} with affine=false has no scale"
    return None


def zero_scale_(module: nn.Module) -> None:
    """Set the scale (gamma) of a norm layer built by make_norm to 0 in place."""
    import torch

    with torch.no_grad():
        module.weight.zero_()


def is_norm_layer(module: nn.Module) -> bool:
    nn = _torch_nn
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm
                      | L.PositiveScaleBatchNorm | L.L2BatchNorm | L.FrozenBatchNorm)
