"""Statistics over seeds, in float64: summaries with t intervals, Welch's test, and a bootstrap
interval of a difference, computed by scipy.stats.

Edge cases are explicit rather than NaN: a sample of one has no standard deviation, no confidence
interval and cannot enter a t-test; two samples that both have zero variance give no Welch test;
arms with fewer than BOOTSTRAP_MIN_N runs get no bootstrap interval (with 4 runs an arm has only
35 distinct resamples, too few for the tails of a 95% interval).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from bnlab.numbers import mean_and_sd

ALPHA = 0.05  # significance level of every test in the report (two-sided)
BOOTSTRAP_MIN_N = 5  # runs per arm before a bootstrap interval is given
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # a fixed stream: the same runs give the same report


@dataclass(frozen=True)
class Summary:
    """n, mean, sample standard deviation (divisor n - 1) and the t-based 95% CI of the mean:
    mean +/- t_{0.975, n-1} * std / sqrt(n). std and CI are None for n < 2; mean is None for
    n = 0."""

    n: int
    mean: float | None
    sd: float | None
    ci_low: float | None
    ci_high: float | None


def summarize(values: Sequence[float], level: float = 0.95) -> Summary:
    xs = [float(v) for v in values]
    n = len(xs)
    m, s = mean_and_sd(xs)
    if n < 2:
        return Summary(n, m, None, None, None)
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * s / math.sqrt(n)
    return Summary(n, m, s, m - half, m + half)


@dataclass(frozen=True)
class Welch:
    """Welch's unequal-variance t-test of mean(a) - mean(b).

    se = sqrt(s_a^2/n_a + s_b^2/n_b), t = diff / se,
    df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))  (Welch-Satterthwaite),
    p = 2 P(T_df > |t|), CI of the difference = diff +/- t_{0.975, df} * se.
    When the test is undefined, t/df/p/CI are None and `reason` says why.
    boot_low/boot_high: the BCa bootstrap 95% interval of the difference (runs resampled within
    each arm), when both arms have at least BOOTSTRAP_MIN_N runs and some spread.
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
    boot_low: float | None = None
    boot_high: float | None = None

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < ALPHA


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Welch:
    sa, sb = summarize(a), summarize(b)
    if sa.n == 0 or sb.n == 0:
        return Welch(None, sa.n, sb.n, reason="an arm has no final accuracy")
    diff = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Welch(diff, sa.n, sb.n, reason="n = 1 in an arm")
    va, vb = sa.sd ** 2 / sa.n, sb.sd ** 2 / sb.n
    if va + vb == 0.0:
        return Welch(diff, sa.n, sb.n, reason="both arms have zero variance")
    with warnings.catch_warnings():
        # scipy warns of cancellation when one arm is (nearly) constant; the variances above
        # are summed exactly (fsum) and the all-constant case is refused, so the test stands
        warnings.filterwarnings("ignore", "Precision loss", RuntimeWarning)
        res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence_level=level)
    boot = bootstrap_diff(a, b, level)
    return Welch(diff, sa.n, sb.n, math.sqrt(va + vb), float(res.statistic), float(res.df),
                 float(res.pvalue), float(ci.low), float(ci.high),
                 boot_low=boot[0] if boot else None, boot_high=boot[1] if boot else None)


def bootstrap_diff(a: Sequence[float], b: Sequence[float],
                   level: float = 0.95) -> tuple[float, float] | None:
    """BCa bootstrap interval of mean(a) - mean(b), each arm resampled on its own; None below
    BOOTSTRAP_MIN_N runs in an arm or when both arms are constant (nothing to resample)."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if min(len(xa), len(xb)) < BOOTSTRAP_MIN_N or (np.ptp(xa) == 0 and np.ptp(xb) == 0):
        return None
    res = stats.bootstrap((xa, xb), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                          vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES,
                          confidence_level=level, method="BCa",
                          rng=np.random.default_rng(BOOTSTRAP_SEED))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None
