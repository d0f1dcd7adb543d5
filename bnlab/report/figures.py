"""PNG figures of a study, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every function returns a list of FigureData (file name, PNG bytes, caption); nothing is written
here. Curves over seeds are drawn as the mean with a band from the minimum to the maximum over
seeds (with 2-3 seeds a standard-deviation band would claim more than the data hold).
"""

from __future__ import annotations

import functools
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from bnlab.report.arms import INCLUDED, Arm
from bnlab.report.load import Run, number
from bnlab.report.probedata import (
    PERCENTILES,
    UNIT_PERCENTILES,
    comparable_model_metrics,
    layers_with,
    model_metrics,
    series,
    units_of,
)
from bnlab.report.tables import ProbeRow, arm_label
from bnlab.store import EpochRow

STYLE = {
    "font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5,
    "lines.linewidth": 1.4, "savefig.dpi": 150, "figure.dpi": 150,
}
BAND_ALPHA = 0.18
WIDTH = 7.0  # inches: a text-width figure at 150 dpi is 1050 px
PANELS_PER_ROW = 4  # one panel per arm in probe figures
MARKERS_UP_TO = 12  # points per curve up to which each point gets a marker


@dataclass
class FigureData:
    file: str
    png: bytes
    caption: str
    alt: str


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"


def _colors(n: int) -> list:
    name, k = ("tab10", 10) if n <= 10 else ("tab20", 20)
    cmap = matplotlib.colormaps[name]
    return [cmap(i % k) for i in range(n)]


def _render(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _new(ncols: int, height: float = 2.6, sharey: bool = False, width: float = WIDTH):
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, sharey=sharey, squeeze=False)[0]
    return fig, list(axes)


def _panels(n: int, sharey: bool = True, per_row: int = PANELS_PER_ROW):
    """n panels, at most `per_row` to a row; unused axes of the last row hidden."""
    cols = min(n, per_row)
    rows = -(-n // cols)
    fig = Figure(figsize=(WIDTH, 2.5 * rows + 0.3), layout="constrained")
    axes = list(fig.subplots(rows, cols, sharey=sharey, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def styled(draw: Callable[..., list[FigureData]]) -> Callable[..., list[FigureData]]:
    """Run a figure function under the report's rc settings (read when artists are made)."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper


def mean_band(per_run: list[dict[int, float]]) -> tuple[list[int], list[float], list[float],
                                                         list[float]]:
    """Per x: mean, min and max over the runs that have a value at x."""
    xs = sorted({x for d in per_run for x in d})
    mean, lo, hi = [], [], []
    for x in xs:
        vals = [d[x] for d in per_run if x in d]
        mean.append(math.fsum(vals) / len(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return xs, mean, lo, hi


def _epoch_series(run: Run, get: Callable[[EpochRow], float | None]) -> dict[int, float]:
    out = {}
    for m in run.metrics:
        v = get(m)
        if v is not None:
            out[m.epoch] = v
    return out


def _plot_band(ax, per_run, color, label, scale=1.0):
    per_run = [d for d in per_run if d]
    if not per_run:
        return
    xs, mean, lo, hi = mean_band(per_run)
    marker = "o" if len(xs) <= MARKERS_UP_TO else None
    ax.plot(xs, [scale * v for v in mean], color=color, label=f"{label} (n={len(per_run)})",
            marker=marker, markersize=3)
    if len(per_run) > 1:
        ax.fill_between(xs, [scale * v for v in lo], [scale * v for v in hi], color=color,
                        alpha=BAND_ALPHA, linewidth=0)


def _legend_below(fig, ax) -> None:
    """One legend for the whole figure, under the panels, so it never hides a curve."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    # As many columns as fit the figure's width: ~0.55 em per character plus the line sample.
    size = matplotlib.rcParams["legend.fontsize"]
    size = size if isinstance(size, int | float) else 7.0
    per_entry = max(len(x) for x in labels) * 0.55 * size + 4 * size
    fits = int(fig.get_figwidth() * 72 // per_entry)
    fig.legend(handles, labels, loc="outside lower center", frameon=False,
               ncol=max(1, min(3, len(handles), fits)))


def _epochs_axis(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _log_if_wide(ax, values: list[float]) -> None:
    """Log scale only when the values span more than a decade; plain tick labels either way."""
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())


def _included(a: Arm) -> list[Run]:
    return [r for r in a.runs if r.status in INCLUDED]


@styled
def curves(dataset: str, arms: list[Arm]) -> list[FigureData]:
    shown = [a for a in arms if a.selected and _included(a)]
    if not shown:
        return []
    fig, (ax_acc, ax_loss) = _new(2, height=3.0)
    losses = []
    for a, color in zip(shown, _colors(len(shown))):
        runs = _included(a)
        acc = [_epoch_series(r, lambda m: number(m.test_acc)) for r in runs]
        loss = [_epoch_series(r, lambda m: number(m.train_loss)) for r in runs]
        losses += [v for d in loss for v in d.values()]
        _plot_band(ax_acc, acc, color, arm_label(a), scale=100.0)
        _plot_band(ax_loss, loss, color, arm_label(a))
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss (cross-entropy)", title="Train loss")
    _log_if_wide(ax_loss, losses)
    _epochs_axis(ax_acc)
    _epochs_axis(ax_loss)
    _legend_below(fig, ax_acc)
    png = _render(fig)
    return [FigureData(
        f"curves-{slug(dataset)}.png", png,
        f"{dataset}: test accuracy after each epoch and mean training loss over each epoch. "
        "Lines: mean over seeds; bands: minimum to maximum over seeds. Completed and "
        "no-learning runs only (diverged and failed runs are excluded, as in the summary "
        "table); n per arm in the legend.",
        f"Training curves on {dataset}")]


@styled
def gap_curves(dataset: str, arms: list[Arm]) -> list[FigureData]:
    shown = [a for a in arms if a.selected and _included(a)]
    if not shown:
        return []
    fig, (ax,) = _new(1, height=3.0)
    for a, color in zip(shown, _colors(len(shown))):
        per_run = [_epoch_series(r, lambda m: _diff(m.train_acc, m.test_acc))
                   for r in _included(a)]
        _plot_band(ax, per_run, color, arm_label(a), scale=100.0)
    ax.axhline(0.0, color="0.4", linewidth=0.6)
    ax.set(xlabel="epoch", ylabel="train − test accuracy (points)", title="Train–test gap")
    _epochs_axis(ax)
    _legend_below(fig, ax)
    return [FigureData(
        f"gap-{slug(dataset)}.png", _render(fig),
        f"{dataset}: train accuracy (running, over each epoch in training mode) minus test "
        "accuracy after the epoch. Lines: mean over seeds; bands: minimum to maximum.",
        f"Train-test gap on {dataset}")]


def _diff(a, b):
    a, b = number(a), number(b)
    return None if a is None or b is None else a - b


def _first_seed_run(a: Arm) -> Run | None:
    """The arm's run with probes and the lowest seed (the one a single-run figure shows)."""
    runs = [r for r in a.runs if r.probes]
    return min(runs, key=lambda r: str(r.seed).zfill(12)) if runs else None


SHADES = {"p15": "0.55", "p50": "0.1", "p85": "0.55"}
LINESTYLES = {"p15": "--", "p50": "-", "p85": ":"}


def _plot_percentiles(ax, run: Run, layer: str, metrics: tuple[str, ...],
                      unit: int | None = None) -> None:
    for m in metrics:
        name = m.split("_", 1)[1]
        xs, ys = series(run.probes, layer, m, unit)
        ax.plot(xs, ys, color=SHADES[name], linestyle=LINESTYLES[name], label=name)


def unit_percentile_figure(dataset: str, rows: list[ProbeRow]) -> tuple[Figure, str] | None:
    """The per-unit figure and its caption (None without unit rows): one row of panels per
    unit, one column per arm (its lowest-seed run with probes), y shared along a row; each
    panel holds p15, p50, p85 in that order."""
    shown = []
    for p in (p for p in rows if p.arm.dataset == dataset):
        run = _first_seed_run(p.arm)
        if run is not None and units_of(run.probes, p.layer):
            shown.append((p, run, units_of(run.probes, p.layer)))
    if not shown:
        return None
    n_rows = max(len(units) for _, _, units in shown)
    fig = Figure(figsize=(WIDTH, 1.9 * n_rows + 0.5), layout="constrained")
    grid = fig.subplots(n_rows, len(shown), sharex=True, sharey="row", squeeze=False)
    for col, (p, run, units) in enumerate(shown):
        for row in range(n_rows):
            ax = grid[row][col]
            if row >= len(units):
                ax.set_visible(False)
                continue
            _plot_percentiles(ax, run, p.layer, UNIT_PERCENTILES, units[row])
            ax.set_title(f"{arm_label(p.arm)}: unit {units[row]}", fontsize=8)
            if col == 0:
                ax.set_ylabel("input")
            if row == len(units) - 1:
                ax.set_xlabel("training step")
    _legend_below(fig, grid[0][0])
    layers = sorted({p.layer for p, _, _ in shown})
    seeds = "; ".join(f"{p.arm.label}: seed {run.seed}, units {', '.join(map(str, units))}"
                      for p, run, units in shown)
    return fig, (
        f"{dataset}: 15th, 50th and 85th percentiles of the input of single units of layer "
        f"{', '.join(layers)} over training (a unit: one feature of a fully connected layer, "
        "one channel of a convolution), as in Ioffe & Szegedy 2015, Fig. 1(b, c); one run per "
        f"arm ({seeds}). Units are chosen from the run's seed, so runs of one seed follow the "
        "same unit indices. The next figure pools all units of the layer.")


@styled
def unit_percentiles(dataset: str, rows: list[ProbeRow]) -> list[FigureData]:
    """Ioffe & Szegedy 2015 Fig. 1(b, c): p15/p50/p85 of single units' inputs over steps."""
    made = unit_percentile_figure(dataset, rows)
    if made is None:
        return []
    fig, caption = made
    return [FigureData(f"unit-percentiles-{slug(dataset)}.png", _render(fig), caption,
                       f"Per-unit input percentiles on {dataset}")]


@styled
def percentiles(dataset: str, rows: list[ProbeRow]) -> list[FigureData]:
    """p15/p50/p85 of one layer's input pooled over all its units, over steps."""
    rows = [p for p in rows if p.arm.dataset == dataset]
    if not rows:
        return []
    fig, axes = _panels(len(rows))
    seeds = []
    for ax, p in zip(axes, rows):
        run = _first_seed_run(p.arm)
        seeds.append(f"{p.arm.label}: seed {run.seed}")
        _plot_percentiles(ax, run, p.layer, PERCENTILES)
        ax.set(title=arm_label(p.arm), xlabel="training step")
    for ax in axes[::PANELS_PER_ROW]:
        ax.set_ylabel(f"input of {rows[0].layer}")
    _legend_below(fig, axes[0])
    return [FigureData(
        f"percentiles-{slug(dataset)}.png", _render(fig),
        f"{dataset}: 15th, 50th and 85th percentiles of the input of layer {rows[0].layer}, "
        "pooled over all its units (all elements of the activation), over training, one run "
        "per arm (" + "; ".join(seeds) + "). Pooling mixes the units' own shifts; the "
        "per-unit view is the previous figure. Table of first/last values and drift: see the "
        "probe table.",
        f"Pooled activation percentiles on {dataset}")]


@styled
def grad_norms(dataset: str, arms: list[Arm]) -> list[FigureData]:
    shown = [(a, _first_seed_run(a)) for a in arms if a.selected and a.dataset == dataset]
    shown = [(a, r) for a, r in shown if r is not None and layers_with(r.probes, "grad_norm")]
    if not shown:
        return []
    fig, axes = _panels(len(shown))
    cmap = matplotlib.colormaps["viridis"]
    for ax, (a, run) in zip(axes, shown):
        layers = [x for x in layers_with(run.probes, "grad_norm") if x != ""]
        for i, layer in enumerate(layers):
            xs, ys = series(run.probes, layer, "grad_norm")
            label = layer if i in (0, len(layers) - 1) else None
            ax.plot(xs, ys, color=cmap(i / max(1, len(layers) - 1)), linewidth=0.9,
                    label=label)
        _log_if_wide(ax, [v for x in layers for v in series(run.probes, x, "grad_norm")[1]])
        ax.set(title=f"{arm_label(a)} (seed {run.seed})", xlabel="training step")
    for ax in axes[::PANELS_PER_ROW]:
        ax.set_ylabel("gradient norm")
    _legend_below(fig, axes[0])
    return [FigureData(
        f"gradnorm-{slug(dataset)}.png", _render(fig),
        f"{dataset}: L2 norm of each layer's weight gradient over training, one run per arm; "
        "colour runs from the first layer (dark) to the last (light).",
        f"Gradient norms per layer on {dataset}")]


def _layer_mean(rows: list[dict], metric: str) -> dict[int, float]:
    """step -> mean of `metric` over the layers (not the whole-model row) that have it."""
    per_step: dict[int, list[float]] = {}
    for r in rows:
        v = number(r.get("value"))
        if r.get("metric") == metric and r.get("layer", "") != "" and v is not None:
            per_step.setdefault(int(r["step"]), []).append(v)
    return {s: math.fsum(vs) / len(vs) for s, vs in per_step.items()}


ICS_METRICS = {"ics_l2": "ICS: ‖G − G′‖₂ (mean over layers)",
               "ics_cos": "ICS: cos(G, G′) (mean over layers)"}


@styled
def ics(dataset: str, arms: list[Arm]) -> list[FigureData]:
    """Internal covariate shift as measured by Santurkar et al. 2018, per arm over steps."""
    shown = [a for a in arms if a.selected and a.dataset == dataset
             and any(r.probes for r in a.runs)]
    metrics = [m for m in ICS_METRICS
               if any(x.get("metric") == m for a in shown for r in a.runs for x in r.probes)]
    if not metrics:
        return []
    fig, axes = _new(len(metrics), height=2.6,
                     width=WIDTH if len(metrics) > 1 else WIDTH * 0.6)
    for ax, metric in zip(axes, metrics):
        for a, color in zip(shown, _colors(len(shown))):
            _plot_band(ax, [_layer_mean(r.probes, metric) for r in a.runs if r.probes], color,
                       arm_label(a))
        ax.set(title=ICS_METRICS[metric], xlabel="training step")
    _legend_below(fig, axes[0])
    return [FigureData(
        f"ics-{slug(dataset)}.png", _render(fig),
        f"{dataset}: internal covariate shift in the sense of Santurkar et al. 2018: G is a "
        "layer's gradient before and G′ after the parameters used before it in the forward "
        "pass take their update step; "
        "averaged over the measured layers. Lines: mean over seeds; bands: minimum to "
        "maximum.", f"Internal covariate shift on {dataset}")]


def _step_sizes(arms: list[Arm]) -> set:
    """The probe_step_sizes of the arms' probed runs (None for runs that did not store it)."""
    return {r.value("probe_step_sizes") for a in arms for r in a.runs if r.probes}


@styled
def model_probe_metrics(dataset: str, arms: list[Arm]) -> list[FigureData]:
    """Whole-model probe metrics (layer ""), e.g. gradient norms and smoothness measures; arms
    are compared only on metrics on the same scale in every arm: never on the smoothness
    measured at lr-relative step sizes, and on the absolute ones only when every probed run
    used the same step sizes."""
    shown = [a for a in arms if a.selected and a.dataset == dataset
             and any(r.probes for r in a.runs)]
    steps = _step_sizes(shown)
    same_steps = len(steps) == 1 and None not in steps
    metrics = [m for m in dict.fromkeys(m for a in shown for r in a.runs
                                        for m in comparable_model_metrics(r.probes))
               if same_steps or not m.endswith("_abs")]
    if not metrics:
        return []
    left_out = sorted({m for a in shown for r in a.runs for m in model_metrics(r.probes)}
                      - set(metrics))
    note = ""
    if any(m.endswith("_abs") for m in metrics):
        sizes = str(next(iter(steps))).replace(",", ", ")
        note += f" *_abs: along −g at the step sizes {sizes} shared by every arm."
    if left_out:
        why = ("step sizes relative to each run's own learning rate, or absolute step sizes "
               "that differ between the arms" if not same_steps else
               "step sizes relative to each run's own learning rate")
        note += (f" Not compared between arms ({why}): {', '.join(left_out)} "
                 "(in probes.jsonl).")
    cols = min(3, len(metrics))
    out = []
    for start in range(0, len(metrics), cols):
        chunk = metrics[start:start + cols]
        fig, axes = _new(cols, height=2.6, width=WIDTH if cols > 1 else WIDTH * 0.6)
        for ax, metric in zip(axes, chunk):
            for a, color in zip(shown, _colors(len(shown))):
                per_run = [dict(zip(*series(r.probes, "", metric))) for r in a.runs if r.probes]
                _plot_band(ax, per_run, color, arm_label(a))
            ax.set(title=metric, xlabel="training step")
        for ax in axes[len(chunk):]:
            ax.set_visible(False)
        _legend_below(fig, axes[0])
        names = ", ".join(chunk)
        out.append(FigureData(
            f"probes-{slug(dataset)}-{start // cols + 1}.png", _render(fig),
            f"{dataset}: whole-model probe metrics ({names}) over training. Lines: mean over "
            "the seeds that recorded probes; bands: minimum to maximum." + note,
            f"Probe metrics {names} on {dataset}"))
    return out
