"""Numbers over seeds and how bnlab writes values: the one home of the mean and sample standard
deviation, their 'mean ± sd' text, and a config value as text, for the report, the prediction
comparisons and the training logs alike (a layer below all three).

The standard deviation is the sample one (divisor n - 1), None for fewer than 2 values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

DASH = "–"  # the text of a missing number


def mean_and_sd(xs: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample sd) of `xs` in float64 sums (math.fsum); (None, None) when empty."""
    n = len(xs)
    if not n:
        return None, None
    mean = math.fsum(xs) / n
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return mean, sd


def spread(values: Sequence[float | None]) -> dict:
    """{"mean", "sd", "n"} of the finite numbers among `values` (the form compare.json stores)."""
    vals = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    mean, sd = mean_and_sd(vals)
    return {"mean": mean, "sd": sd, "n": len(vals)}


def mean_sd(s: Any, scale: float = 1.0, digits: int = 4, missing: str = DASH) -> str:
    """A spread ({"mean", "sd"}) or a summary (attributes mean, sd) as 'mean ± sd', the mean
    alone without an sd (n = 1), `missing` without a mean: the one way the terminal, the
    figures and the report write it."""
    mean, sd = ((s.get("mean"), s.get("sd")) if isinstance(s, dict)
                else (getattr(s, "mean", None), getattr(s, "sd", None)))
    if isinstance(mean, bool) or not isinstance(mean, int | float):
        return missing
    text = _fixed(scale * mean, digits)
    return text + (f" ± {_fixed(scale * sd, digits)}" if isinstance(sd, int | float) else "")


HUGE = 1e6  # from here on a number is written with an exponent: 7.92e+36, not 37 digits


def _fixed(v: float, digits: int) -> str:
    """`digits` decimals; a huge value (a diverged network's loss) with an exponent, so it
    cannot stretch a table cell to dozens of digits."""
    return f"{v:.{max(digits, 3)}g}" if abs(v) >= HUGE else f"{v:.{digits}f}"


def fmt_value(v: Any) -> str:
    """A config value as text: true/false, floats in %g, dicts as {k=v, ...} sorted by key."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={fmt_value(x)}" for k, x in sorted(v.items())) + "}"
    return str(v)
