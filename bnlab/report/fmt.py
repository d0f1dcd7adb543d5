"""How numbers are written in the report (one place, so tables and findings agree)."""

from __future__ import annotations

from bnlab.numbers import DASH, mean_sd
from bnlab.report.stats import ALPHA, Summary


def pct(x: float | None, digits: int = 2) -> str:
    """An accuracy (fraction) as percent."""
    return DASH if x is None else f"{100.0 * x:.{digits}f}"


def points(x: float | None, digits: int = 2, sign: bool = True) -> str:
    """A difference of accuracies (fraction) in percentage points."""
    if x is None:
        return DASH
    return f"{100.0 * x:+.{digits}f}" if sign else f"{100.0 * abs(x):.{digits}f}"


def mean_std(s: Summary | dict | None, scale: float = 100.0, digits: int = 2) -> str:
    """A Summary or a stored spread as 'mean ± sd' (the mean alone for n = 1), in percent by
    default."""
    return mean_sd(s, scale, digits, DASH)


def interval(lo: float | None, hi: float | None, scale: float = 100.0, digits: int = 2,
             sign: bool = False) -> str:
    if lo is None or hi is None:
        return DASH
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"[{f.format(scale * lo)}, {f.format(scale * hi)}]"


def pvalue(p: float | None) -> str:
    if p is None:
        return DASH
    if p < 0.001:
        return "< 0.001"
    # Near alpha, three decimals could print 0.050 for both sides of the threshold.
    return f"{p:.4f}" if round(p, 3) == ALPHA else f"{p:.3f}"


def p_phrase(p: float) -> str:
    """'p = 0.012' or 'p < 0.001' for running text."""
    text = pvalue(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return DASH
    return f"{x:.{digits}g}"


def seconds(x: float | None) -> str:
    if x is None:
        return DASH
    return f"{x:.1f}"


def signed_sd(s: Summary, digits: int = 3) -> str:
    """A signed mean ± sd ('+0.512 ± 0.031'); without '± sd' for a single value."""
    if s.mean is None:
        return DASH
    text = f"{s.mean:+.{digits}f}"
    return text if s.sd is None else f"{text} ± {s.sd:.{digits}f}"


def value_sd(s: Summary, digits: int = 3) -> str:
    """A mean ± sd ('0.512 ± 0.031'); without '± sd' for a single value."""
    if s.mean is None:
        return DASH
    text = f"{s.mean:.{digits}f}"
    return text if s.sd is None else f"{text} ± {s.sd:.{digits}f}"
