"""Series out of probes.jsonl rows (long format: step, epoch, layer, metric, value, and unit on
the per-unit rows; bnlab.train.probes defines every metric).

The percentile view follows Ioffe & Szegedy 2015, Fig. 1(b, c): the 15th, 50th and 85th
percentiles of the input of one sigmoid unit over training steps (unit_p15/p50/p85 of a few
units per layer), with the percentiles pooled over all units of the layer (act_p15/p50/p85) as
a second view. The layer shown is the deepest leaf layer with act_p50 rows (for mlp3x100 the
input of the last sigmoid, "hidden.2.sigmoid", as in the paper; block outputs, which contain
other probed layers, are passed over).

Smoothness along -g is recorded at step sizes relative to each run's learning rate (suffix _lr;
before the suffixes existed, without one) and at absolute step sizes shared by every arm
(suffix _abs). Only the absolute ones are on the same scale in every arm, so only they are
compared between arms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bnlab.report.load import Run, number

PERCENTILES = ("act_p15", "act_p50", "act_p85")
UNIT_PERCENTILES = ("unit_p15", "unit_p50", "unit_p85")
SMOOTHNESS = ("loss_variation", "grad_predictiveness", "beta_smoothness")


def series(rows: list[dict], layer: str, metric: str,
           unit: int | None = None) -> tuple[list[int], list[float]]:
    """(steps, values) of one layer's metric (of one unit when `unit` is given), sorted by
    step; non-finite values dropped."""
    pts = sorted((int(r["step"]), number(r.get("value"))) for r in rows
                 if r.get("layer") == layer and r.get("metric") == metric
                 and r.get("unit") == unit)
    pts = [(s, v) for s, v in pts if v is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def layers_with(rows: list[dict], metric: str) -> list[str]:
    """Layers that have `metric`, in order of first appearance."""
    return list(dict.fromkeys(r.get("layer", "") for r in rows if r.get("metric") == metric))


def percentile_layer(rows: list[dict]) -> str | None:
    """The deepest leaf layer with act_p50 rows: the last in order of appearance among layers
    that are not a parent of another one (a block "hidden.2" contains "hidden.2.sigmoid")."""
    layers = [x for x in layers_with(rows, "act_p50") if x != ""]
    leaves = [x for x in layers if not any(y.startswith(x + ".") for y in layers)]
    return (leaves or layers)[-1] if layers else None


def units_of(rows: list[dict], layer: str) -> list[int]:
    """The units with unit_p50 rows in `layer`, sorted."""
    return sorted({int(r["unit"]) for r in rows if r.get("layer") == layer
                   and r.get("metric") == "unit_p50" and isinstance(r.get("unit"), int)})


def lr_relative(metric: str) -> bool:
    """A smoothness metric measured at step sizes relative to the run's own learning rate."""
    return metric in SMOOTHNESS or any(metric == f"{m}_lr" for m in SMOOTHNESS)


def model_metrics(rows: list[dict]) -> list[str]:
    """Whole-model metrics (layer "") present in the rows, in order of first appearance."""
    return list(dict.fromkeys(r["metric"] for r in rows if r.get("layer", "") == ""
                              and r.get("metric")))


def comparable_model_metrics(rows: list[dict]) -> list[str]:
    """The whole-model metrics on the same scale in every arm (all but the lr-relative ones)."""
    return [m for m in model_metrics(rows) if not lr_relative(m)]


DRIFT_PROBES = 5  # probes averaged at each end of a run for the drift of a percentile


def drift_window(n: int) -> int:
    """Probes averaged at each end of a series of n: DRIFT_PROBES, fewer for a short series (at
    most a quarter of it, at least 1), so the two ends never overlap."""
    return max(1, min(DRIFT_PROBES, n // 4))


def window_drift(values: list[float], k: int | None = None) -> float:
    """Mean of the last k values minus mean of the first k (k = drift_window(len(values))).
    Unlike max − min, which grows with the probe-to-probe noise even when nothing moves, its
    noise shrinks as 1/sqrt(k) and is centred on the true change."""
    k = drift_window(len(values)) if k is None else k
    return math.fsum(values[-k:]) / k - math.fsum(values[:k]) / k


@dataclass
class PercentileDrift:
    """One run's percentile series of one layer: the means of its first and last `window`
    probes of the pooled percentiles, and each followed unit's change of median."""

    layer: str
    first_step: int
    last_step: int
    window: int  # probes averaged at each end
    first: dict[str, float]  # metric -> mean over the first `window` probes
    last: dict[str, float]  # metric -> mean over the last `window` probes
    unit_changes: dict[int, float]  # unit -> window_drift of its unit_p50

    @property
    def p50_change(self) -> float:
        return self.last["act_p50"] - self.first["act_p50"]

    @property
    def width_change(self) -> float:
        """Change of the spread p85 − p15 (the paper's "mean and variance")."""
        return ((self.last["act_p85"] - self.last["act_p15"])
                - (self.first["act_p85"] - self.first["act_p15"]))

    @property
    def unit_abs_change(self) -> float | None:
        """Mean over the followed units of |change of the unit's median| (None: no units)."""
        if not self.unit_changes:
            return None
        return math.fsum(abs(v) for v in self.unit_changes.values()) / len(self.unit_changes)


def percentile_drift(run: Run, layer: str) -> PercentileDrift | None:
    got = {m: series(run.probes, layer, m) for m in PERCENTILES}
    if any(not steps for steps, _ in got.values()):
        return None
    steps50, _ = got["act_p50"]
    k = min(drift_window(len(vals)) for _, vals in got.values())
    units = {}
    for u in units_of(run.probes, layer):
        _, vals = series(run.probes, layer, "unit_p50", u)
        if vals:
            units[u] = window_drift(vals, min(k, drift_window(len(vals))))
    return PercentileDrift(
        layer=layer, first_step=steps50[0], last_step=steps50[-1], window=k,
        first={m: math.fsum(vals[:k]) / k for m, (_, vals) in got.items()},
        last={m: math.fsum(vals[-k:]) / k for m, (_, vals) in got.items()},
        unit_changes=units)
