"""Statistics over seeds, in float64, with no dependency beyond the standard library.

Student's t distribution is computed from the regularized incomplete beta function:

    P(T > t | df) = 1/2 * I_x(df/2, 1/2),    x = df / (df + t^2),  t >= 0

and its quantile by bisection on that tail probability. I_x(a, b) is evaluated with the
continued fraction of Numerical Recipes (modified Lentz), using the symmetry
I_x(a, b) = 1 - I_{1-x}(b, a) where x > (a + 1) / (a + b + 2) so the fraction converges fast.

Edge cases are explicit rather than NaN: a sample of one has no standard deviation, no confidence
interval and cannot enter a t-test; two samples that both have zero variance give no Welch test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 0.05  # significance level of every test in the report (two-sided)

_EPS = 1e-16
_TINY = 1e-300
_MAX_ITER = 10_000


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (without the prefactor), modified Lentz's method."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITER + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, "
                          f"x={x})")


def betainc(a: float, b: float, x: float, xc: float | None = None) -> float:
    """Regularized incomplete beta I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0, 0 <= x <= 1.

    `xc` may pass 1 - x computed without cancellation (e.g. t^2 / (df + t^2)).
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    xc = 1.0 - x if xc is None else xc
    if x == 0.0:
        return 0.0
    if xc == 0.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log(xc))
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, xc) / b


def t_sf(t: float, df: float) -> float:
    """Survival function P(T > t) of Student's t with `df` > 0 degrees of freedom."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    t2 = t * t
    half_tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))
    return half_tail if t >= 0 else 1.0 - half_tail


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) of Student's t."""
    return t_sf(-t, df)


def t_ppf(p: float, df: float) -> float:
    """Quantile of Student's t: the t with P(T <= t) = p, by bisection on the tail probability.

    Bisection runs until the bracket cannot shrink in float64, so the result is as exact as the
    tail probability itself.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    q = 1.0 - p  # wanted upper-tail probability
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > q:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            return math.inf
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return hi if abs(t_sf(hi, df) - q) <= abs(t_sf(lo, df) - q) else lo
        if t_sf(mid, df) > q:
            lo = mid
        else:
            hi = mid


@dataclass(frozen=True)
class Summary:
    """n, mean, sample standard deviation (divisor n - 1) and the t-based 95% CI of the mean:
    mean +/- t_{0.975, n-1} * std / sqrt(n). std and CI are None for n < 2; mean is None for
    n = 0."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None


def summarize(values: Sequence[float], level: float = 0.95) -> Summary:
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Summary(0, None, None, None, None)
    m = math.fsum(xs) / n
    if n == 1:
        return Summary(1, m, None, None, None)
    var = math.fsum((x - m) ** 2 for x in xs) / (n - 1)
    s = math.sqrt(var)
    half = t_ppf(0.5 + level / 2.0, n - 1) * s / math.sqrt(n)
    return Summary(n, m, s, m - half, m + half)


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t-test of mean(a) - mean(b).

    se = sqrt(s_a^2/n_a + s_b^2/n_b), t = diff / se,
    df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))  (Welch-Satterthwaite),
    p = 2 P(T_df > |t|), CI of the difference = diff +/- t_{0.975, df} * se.
    When the test is undefined, t/df/p/CI are None and `reason` says why.
    """

    diff: float | None
    n_a: int
    n_b: int
    se: float | None = None
    t: float | None = None
    df: float | None = None
    p: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    reason: str | None = None

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Welch:
    sa, sb = summarize(a), summarize(b)
    if sa.n == 0 or sb.n == 0:
        return Welch(None, sa.n, sb.n, reason="an arm has no finished runs")
    diff = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Welch(diff, sa.n, sb.n, reason="n = 1 in an arm")
    va, vb = sa.std ** 2 / sa.n, sb.std ** 2 / sb.n
    if va + vb == 0.0:
        return Welch(diff, sa.n, sb.n, reason="both arms have zero variance")
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    t = diff / se
    p = min(1.0, 2.0 * t_sf(abs(t), df))
    half = t_ppf(0.5 + level / 2.0, df) * se
    return Welch(diff, sa.n, sb.n, se, t, df, p, diff - half, diff + half)
