"""Normalization layers by name: one factory, `make_norm`, used by every model."""

from __future__ import annotations

from torch import nn

from bnlab.errors import UserError, unknown

# name -> one-line formula (shown by `bnlab norms`)
FORMULAS: dict[str, str] = {
    "bn": "y = (x - mean_B) / sqrt(var_B + eps) * gamma + beta  (torch.nn.BatchNorm)",
    "none": "y = x  (identity; convolutions get a bias instead)",
}


def make_norm(name: str, num_features: int, dim: int = 2, **options) -> nn.Module:
    """A normalization layer over `num_features` channels of a `dim`-d input (1 = (N, C))."""
    if name == "none":
        return nn.Identity()
    if name == "bn":
        cls = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        allowed = {"momentum", "eps", "affine"}
        bad = set(options) - allowed
        if bad:
            raise UserError(f"unknown option {sorted(bad)[0]!r} for norm 'bn'; accepted: "
                            f"{', '.join(sorted(allowed))}")
        return cls(num_features, **options)
    raise unknown("norm", name, FORMULAS)


def has_bias_substitute(name: str) -> bool:
    """True when a norm adds no shift, so the preceding conv/linear needs its own bias."""
    return name == "none"


def is_norm_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm)
