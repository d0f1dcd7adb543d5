"""Normalization: `make_norm(name, channels, **options)` and what models ask about a norm.

factory.py  names, formulas and options -> layers (`make_norm`, `FORMULAS`, `OPTIONS`)
layers.py   the layers, each written from its formula (docstrings state the statistics)
table.py    `bnlab norms --table`: each norm's output statistics on one fixed batch
"""

from bnlab.norm.factory import (
    FORMULAS,
    NORMS,
    OPTIONS,
    has_bias_substitute,
    is_norm_layer,
    make_norm,
    zero_scale_,
    zero_scale_refusal,
)

__all__ = ["FORMULAS", "NORMS", "OPTIONS", "has_bias_substitute", "is_norm_layer", "make_norm",
           "zero_scale_", "zero_scale_refusal"]
