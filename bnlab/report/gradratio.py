"""The gradient-norm ratio of the first to the last weight layer, at the first and the last
probe step of each run (probes.jsonl: metric grad_norm, per conv/linear layer).

    ratio(t) = ||dL/dW_first||_2 / ||dL/dW_last||_2   at probe step t

with "first" and "last" the first and last weight layers in the order the probes recorded
them (the model's module order: the stem conv and the classifier in bnlab's CIFAR nets). At
step 0 the gradient is that of the initial weights, so the first column measures how the
gradient reaching the input layer compares with the output layer's at initialization: far
below 1 is a vanishing gradient, far above 1 an exploding one (the measure of He et al. 2016
and Ioffe & Szegedy 2015's motivation). Non-finite values are skipped, so a diverged run's last
step is its last finite probe step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bnlab.report.arms import Arm
from bnlab.report.document import Table
from bnlab.report.load import Run
from bnlab.report.probedata import layers_with, series
from bnlab.report.stats import Summary, summarize
from bnlab.report.tables import arm_label

DASH = "–"


@dataclass
class RunRatio:
    first_layer: str
    last_layer: str
    first_step: int
    last_step: int
    at_first: float | None  # None: the last layer's gradient was 0 (the ratio is undefined)
    at_last: float | None


def run_ratio(run: Run) -> RunRatio | None:
    """The run's ratios, None without grad_norm rows at two common steps of both layers."""
    layers = [x for x in layers_with(run.probes, "grad_norm") if x != ""]
    if len(layers) < 2:
        return None
    first = dict(zip(*series(run.probes, layers[0], "grad_norm")))
    last = dict(zip(*series(run.probes, layers[-1], "grad_norm")))
    steps = sorted(set(first) & set(last))
    if not steps:
        return None

    def ratio(step: int) -> float | None:
        return first[step] / last[step] if last[step] > 0 else None

    return RunRatio(layers[0], layers[-1], steps[0], steps[-1], ratio(steps[0]),
                    ratio(steps[-1]))


def _cell(s: Summary) -> str:
    if s.mean is None:
        return DASH
    if s.sd is None:
        return f"{s.mean:.3g}"
    return f"{s.mean:.3g} ± {s.sd:.2g}"


def _summary(values: list[float | None]) -> Summary:
    return summarize([v for v in values if v is not None and math.isfinite(v)])


def grad_ratio_table(arms: list[Arm], number: int) -> Table | None:
    """One row per selected arm with probes: its first/last layer gradient-norm ratios."""
    rows = []
    for a in arms:
        if not a.selected:
            continue
        ratios = [r for r in (run_ratio(run) for run in a.runs if run.probes) if r is not None]
        if not ratios:
            continue
        lo, hi = min(r.last_step for r in ratios), max(r.last_step for r in ratios)
        steps = (f"{min(r.first_step for r in ratios)}", f"{lo}" if lo == hi else f"{lo}–{hi}")
        init, end = _summary([r.at_first for r in ratios]), _summary([r.at_last for r in ratios])
        rows.append([a.dataset, arm_label(a), ratios[0].first_layer, ratios[0].last_layer,
                     str(len(ratios)), steps[0], _cell(init), steps[1], _cell(end)])
    if not rows:
        return None
    notes = ["Ratio: L2 norm of the first weight layer's gradient divided by the last weight "
             "layer's, on the probe batch (training mode, before the update); step 0 is the "
             "initialization. Mean ± sample standard deviation over the n runs of the arm that "
             "recorded probes; a ratio whose last-layer gradient is 0 is left out.",
             "Far below 1: the gradient vanishes on its way to the input; far above 1: it "
             "explodes. The last step of a diverged run is its last probe step with finite "
             "values."]
    head = ["Dataset", "Arm", "First layer", "Last layer", "n", "First step",
            "Ratio at first step", "Last step", "Ratio at last step"]
    return Table(number, "Gradient norm of the first over the last weight layer", head, rows,
                 notes, numeric=[False] * 4 + [True] * 5, anchor="grad-ratio")
