"""Normalization: `make_norm(name, channels, **options)` and what models ask about a norm.

factory.py  the registry (`REGISTRY`: one `NormSpec` per norm: builder, formula, options,
            traits) and what reads it (`make_norm`, `norm_options`, `has_bias_substitute`, ...)
layers.py   the layers, each written from its formula (docstrings state the statistics)
table.py    `bnlab norms --table`: each norm's output statistics on one fixed batch
"""

from bnlab.norm.factory import (
    FORMULAS,
    NORMS,
    OPTIONS,
    PACKABLE_NORMS,
    REGISTRY,
    NormSpec,
    has_bias_substitute,
    is_norm_layer,
    make_norm,
    norm_options,
    norm_spec,
    zero_scale_,
    zero_scale_refusal,
)

__all__ = ["FORMULAS", "NORMS", "OPTIONS", "PACKABLE_NORMS", "REGISTRY", "NormSpec",
           "has_bias_substitute", "is_norm_layer", "make_norm", "norm_options", "norm_spec",
           "zero_scale_", "zero_scale_refusal"]
