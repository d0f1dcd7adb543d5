"""PNG figures of the probes (bnlab.train.probes): input percentiles per unit and pooled,
gradient norms per layer, internal covariate shift and the whole-model metrics.

A diverged run is not drawn as data: its last probe values (up to 1e24 in a no-BN ResNet at
BN's learning rate) would flatten every other curve. An arm whose probed runs all diverged is
drawn as a dashed vertical marker at the step where it diverged, named "diverged at step N" in
the legend (figures that overlay the arms), or as a panel that says so (figures with a panel per
arm). Values that span more than a decade get a log axis; a curve of a dozen points or fewer
gets a marker at each point, so a single probe step is visible.
"""

from __future__ import annotations

import math
import textwrap

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bnlab.report.arms import Arm
from bnlab.report.figures import (
    MARKERS_UP_TO,
    PANELS_PER_ROW,
    WIDTH,
    FigureData,
    _colors,
    _epochs_axis,
    _legend_below,
    _log_if_wide,
    _new,
    _panels,
    _plot_band,
    _render,
    columns,
    slug,
    styled,
)
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
from bnlab.report.tables import ProbeRow, arm_label, diverged_at

SHADES = {"p15": "0.55", "p50": "0.1", "p85": "0.55"}
LINESTYLES = {"p15": "--", "p50": "-", "p85": ":"}
TITLE_CHARS = 88  # characters of title across the figure's width at the title font size
# (less than the width holds: the first panel of a row gives part of its width to y labels)


def _probed(a: Arm) -> tuple[list[Run], list[Run]]:
    """(runs drawn, diverged runs) of the arm's runs with probes."""
    runs = [r for r in a.runs if r.probes]
    return [r for r in runs if r.status != "diverged"], [r for r in runs if r.status == "diverged"]


def _by_seed(runs: list[Run]) -> Run | None:
    return min(runs, key=lambda r: str(r.seed).zfill(12)) if runs else None


def shown_run(a: Arm) -> tuple[Run | None, Run | None]:
    """(the run a single-run figure draws: the lowest seed that did not diverge, the lowest
    diverged run when every probed run diverged)."""
    drawn, diverged = _probed(a)
    return _by_seed(drawn), (_by_seed(diverged) if not drawn else None)


def divergence_step(run: Run) -> int | None:
    """The step at which the run diverged (its last recorded step when only the test loss
    showed it)."""
    step = number(run.summary.get("diverged_step"))
    if step is None and run.metrics:
        step = number(run.metrics[-1].get("step"))
    return None if step is None else int(step)


def note_panel(ax, text: str) -> None:
    """A panel with nothing to draw: no axes or shared limits, a note in its middle."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(text, 34)), transform=ax.transAxes,
            ha="center", va="center", fontsize=7, color="0.3")


def mark_diverged(ax, a: Arm, run: Run, color) -> None:
    """The arm as a dashed vertical line at its divergence step, named in the legend."""
    step = divergence_step(run)
    if step is not None:
        ax.axvline(step, color=color, linestyle="--", linewidth=1.0,
                   label=f"{arm_label(a)}: {diverged_at(run)} (not drawn)")


def label_rows(axes, label: str) -> None:
    """The y label and tick labels on the first drawn panel of each row of a shared-y panel
    grid: a row that starts with a note panel (its arm diverged) keeps its scale readable."""
    rows: dict[int, list] = {}
    for ax in axes:  # grouped by the grid row each panel sits in (figures.columns)
        rows.setdefault(ax.get_subplotspec().rowspan.start, []).append(ax)
    for row in ([ax for ax in r if ax.axison] for r in rows.values()):
        if row:
            row[0].tick_params(axis="y", labelleft=True)
            row[0].set_ylabel(label)


def _title(ax, text: str, panels: int) -> None:
    """A panel title wrapped to its share of the figure's width, so neighbours never meet."""
    width = max(12, TITLE_CHARS // max(1, panels))
    ax.set_title("\n".join(textwrap.wrap(text, width)), fontsize=8)


def _steps_axis(ax) -> None:
    """Integer steps on x, at most 5 ticks (four-digit steps in a third of the figure's width
    ran into each other at matplotlib's default count); a panel whose points all sit at one
    step is centred on it."""
    _epochs_axis(ax)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.set_xlabel("training step")


def _plot_percentiles(ax, run: Run, layer: str, metrics: tuple[str, ...],
                      unit: int | None = None) -> None:
    for m in metrics:
        name = m.split("_", 1)[1]
        xs, ys = series(run.probes, layer, m, unit)
        ax.plot(xs, ys, color=SHADES[name], linestyle=LINESTYLES[name], label=name,
                marker="o" if len(xs) <= MARKERS_UP_TO else None, markersize=2.5)


def _diverged_text(a: Arm, run: Run) -> str:
    return (f"{diverged_at(run)} (seed {run.seed}); its values are not drawn (they "
            "explode before the loss is non-finite)")


def _unit_columns(dataset: str, rows: list[ProbeRow]) -> list[tuple[ProbeRow, Run, list]]:
    """(probe row, run drawn, its units) per arm: units empty for an arm that diverged."""
    shown = []
    for p in (p for p in rows if p.arm.dataset == dataset):
        run, gone = shown_run(p.arm)
        if run is not None and units_of(run.probes, p.layer):
            shown.append((p, run, units_of(run.probes, p.layer)))
        elif gone is not None:
            shown.append((p, gone, []))
    return shown


def unit_percentile_figure(dataset: str, rows: list[ProbeRow],
                           shown: list | None = None) -> tuple[Figure, str] | None:
    """The per-unit figure and its caption (None without unit rows): one row of panels per
    unit, one column per arm (its lowest-seed run with probes that did not diverge), y shared
    along a row; each panel holds p15, p50, p85 in that order. `shown`: the arms' columns
    to draw (default: every arm of the dataset)."""
    shown = _unit_columns(dataset, rows) if shown is None else shown
    if not any(units for _, _, units in shown):
        return None
    n_rows = max(len(units) for _, _, units in shown)
    fig = Figure(figsize=(WIDTH, 1.9 * n_rows + 0.5), layout="constrained")
    grid = fig.subplots(n_rows, len(shown), sharex=True, sharey="row", squeeze=False)
    legend_ax = None
    for col, (p, run, units) in enumerate(shown):
        for row in range(n_rows):
            ax = grid[row][col]
            if not units:
                if row == 0:
                    _title(ax, arm_label(p.arm), len(shown))
                    note_panel(ax, _diverged_text(p.arm, run))
                else:
                    ax.set_visible(False)
                continue
            if row >= len(units):
                ax.set_visible(False)
                continue
            _plot_percentiles(ax, run, p.layer, UNIT_PERCENTILES, units[row])
            legend_ax = legend_ax or ax
            _title(ax, f"{arm_label(p.arm)}: unit {units[row]}", len(shown))
            if row == len(units) - 1:
                _steps_axis(ax)
    for row in grid:  # y shared along a row: its first drawn panel carries the scale
        drawn = [ax for ax in row if ax.get_visible() and ax.axison]
        if drawn:
            drawn[0].tick_params(axis="y", labelleft=True)
            drawn[0].set_ylabel("input")
    _legend_below(fig, legend_ax)
    layers = sorted({p.layer for p, _, _ in shown})
    seeds = "; ".join(f"{p.arm.label}: seed {run.seed}, units {', '.join(map(str, units))}"
                      for p, run, units in shown if units)
    return fig, (
        f"{dataset}: 15th, 50th and 85th percentiles of the input of single units of layer "
        f"{', '.join(layers)} over training (a unit: one feature of a fully connected layer, "
        "one channel of a convolution), on the probes' fixed batch of held-out images, as in "
        f"Ioffe & Szegedy 2015, Fig. 1(b, c); one run per arm ({seeds}). Units are chosen "
        "from the layer's name and width alone, so every arm and seed follows the same unit "
        "indices. The next figure pools all units of the layer.")


@styled
def unit_percentiles(dataset: str, rows: list[ProbeRow]) -> list[FigureData]:
    """Ioffe & Szegedy 2015 Fig. 1(b, c): p15/p50/p85 of single units' inputs over steps."""
    shown = _unit_columns(dataset, rows)
    if not any(units for _, _, units in shown):
        return []
    # at most PANELS_PER_ROW arms side by side: more would squeeze titles into each other
    out, start = [], 0
    counts = _rows_of(len(shown), PANELS_PER_ROW)
    for k, count in enumerate(counts, 1):
        chunk = shown[start:start + count]
        start += count
        made = unit_percentile_figure(dataset, rows, chunk)
        if made is None:  # every arm of this part diverged: one panel each that says so
            made = _diverged_columns(chunk), (
                f"{dataset}: per-unit input percentiles; every arm of this part diverged.")
        fig, caption = made
        part = f"-{k}" if len(counts) > 1 else ""
        out.append(FigureData(f"unit-percentiles-{slug(dataset)}{part}.png", _render(fig),
                              caption, f"Per-unit input percentiles on {dataset}{part}"))
    return out


def _diverged_columns(chunk) -> Figure:
    fig, axes = _panels(len(chunk))
    for ax, (p, run, _) in zip(axes, chunk):
        _title(ax, arm_label(p.arm), len(chunk))
        note_panel(ax, _diverged_text(p.arm, run))
    return fig


@styled
def percentiles(dataset: str, rows: list[ProbeRow]) -> list[FigureData]:
    """p15/p50/p85 of one layer's input pooled over all its units, over steps."""
    rows = [p for p in rows if p.arm.dataset == dataset]
    if not rows:
        return []
    fig, axes = _panels(len(rows))
    seeds, legend_ax = [], None
    for ax, p in zip(axes, rows):
        run, gone = shown_run(p.arm)
        _title(ax, arm_label(p.arm), columns(len(rows)))
        if run is None:
            note_panel(ax, _diverged_text(p.arm, gone))
            continue
        seeds.append(f"{p.arm.label}: seed {run.seed}")
        _plot_percentiles(ax, run, p.layer, PERCENTILES)
        legend_ax = legend_ax or ax
        _steps_axis(ax)
    label_rows(axes, f"input of {rows[0].layer}")
    _legend_below(fig, legend_ax)
    return [FigureData(
        f"percentiles-{slug(dataset)}.png", _render(fig),
        f"{dataset}: 15th, 50th and 85th percentiles of the input of layer {rows[0].layer}, "
        "pooled over all its units (all elements of the activation), on the probes' fixed "
        "batch, over training, one run per arm (" + "; ".join(seeds) + "). Pooling mixes the "
        "units' own shifts; the per-unit view is the previous figure. Table of first/last "
        "values and drift: see the probe table.",
        f"Pooled activation percentiles on {dataset}")]


@styled
def grad_norms(dataset: str, arms: list[Arm]) -> list[FigureData]:
    shown = []
    for a in arms:
        if not (a.selected and a.dataset == dataset):
            continue
        run, gone = shown_run(a)
        if (run or gone) is not None and layers_with((run or gone).probes, "grad_norm"):
            shown.append((a, run, gone))
    if not shown:
        return []
    fig, axes = _panels(len(shown))
    cmap = matplotlib.colormaps["viridis"]
    legend_ax, values = None, []
    for ax, (a, run, gone) in zip(axes, shown):
        if run is None:
            _title(ax, arm_label(a), columns(len(shown)))
            note_panel(ax, _diverged_text(a, gone))
            continue
        layers = [x for x in layers_with(run.probes, "grad_norm") if x != ""]
        for i, layer in enumerate(layers):
            xs, ys = series(run.probes, layer, "grad_norm")
            values += ys
            label = layer if i in (0, len(layers) - 1) else None
            ax.plot(xs, ys, color=cmap(i / max(1, len(layers) - 1)), linewidth=0.9,
                    label=label, marker="o" if len(xs) <= MARKERS_UP_TO else None,
                    markersize=2)
        legend_ax = legend_ax or ax
        _title(ax, f"{arm_label(a)} (seed\u00a0{run.seed})", columns(len(shown)))
        _steps_axis(ax)
    drawn = [ax for ax, (_, run, _) in zip(axes, shown) if run is not None]
    for ax in drawn:  # the y axis is shared: log on all when the norms span decades
        _log_if_wide(ax, values)
    label_rows(axes, "gradient norm")
    _legend_below(fig, legend_ax)
    return [FigureData(
        f"gradnorm-{slug(dataset)}.png", _render(fig),
        f"{dataset}: L2 norm of each layer's weight gradient over training, one run per arm "
        "(the same y scale in every panel); colour runs from the first layer (dark) to the "
        "last (light).",
        f"Gradient norms per layer on {dataset}")]


def _layer_mean(rows: list[dict], metric: str) -> dict[int, float]:
    """step -> mean of `metric` over the layers (not the whole-model row) that have it."""
    per_step: dict[int, list[float]] = {}
    for r in rows:
        v = number(r.get("value"))
        if r.get("metric") == metric and r.get("layer", "") != "" and v is not None:
            per_step.setdefault(int(r["step"]), []).append(v)
    return {s: math.fsum(vs) / len(vs) for s, vs in per_step.items()}


def _overlay(ax, shown: list[Arm], values_of) -> list[float]:
    """Each arm's band over the runs that did not diverge, or its divergence marker; returns
    the values drawn."""
    drawn = []
    for a, color in zip(shown, _colors(len(shown))):
        runs, diverged = _probed(a)
        per_run = [d for d in (values_of(r) for r in runs) if d]
        if per_run:
            _plot_band(ax, per_run, color, arm_label(a))
            drawn += [v for d in per_run for v in d.values()]
        elif diverged:
            mark_diverged(ax, a, _by_seed(diverged), color)
    return drawn


DIVERGED_NOTE = (" An arm whose probed runs all diverged is a dashed line at the step where it "
                 "diverged (its values are not drawn); a diverged run of another arm is left "
                 "out of its band.")

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
        values = _overlay(ax, shown, lambda r, metric=metric: _layer_mean(r.probes, metric))
        if metric == "ics_l2":
            _log_if_wide(ax, values)
        _title(ax, ICS_METRICS[metric], len(metrics))
        _steps_axis(ax)
    _legend_below(fig, axes[0])
    return [FigureData(
        f"ics-{slug(dataset)}.png", _render(fig),
        f"{dataset}: internal covariate shift in the sense of Santurkar et al. 2018: G is a "
        "layer's gradient before and G′ after the parameters used before it in the forward "
        "pass take their update step; averaged over the measured layers. Lines: mean over "
        "seeds; bands: minimum to maximum." + DIVERGED_NOTE,
        f"Internal covariate shift on {dataset}")]


def _step_sizes(arms: list[Arm]) -> set:
    """The probe_step_sizes of the arms' probed runs (None for runs that did not store it)."""
    return {r.value("probe_step_sizes") for a in arms for r in a.runs if r.probes}


def _rows_of(n: int, per_row: int = 3) -> list[int]:
    """Panels per figure for n panels, at most per_row each, as even as possible (5: 3, 2)."""
    figures = -(-n // per_row)
    return [n // figures + (1 if i < n % figures else 0) for i in range(figures)]


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
    out, start = [], 0
    for k, count in enumerate(_rows_of(len(metrics)), 1):
        chunk = metrics[start:start + count]
        start += count
        fig, axes = _new(count, height=2.6, width=WIDTH * max(count, 2) / 3)
        for ax, metric in zip(axes, chunk):
            values = _overlay(ax, shown, lambda r, metric=metric:
                              dict(zip(*series(r.probes, "", metric))))
            _log_if_wide(ax, values)
            _title(ax, metric, count)
            _steps_axis(ax)
        _legend_below(fig, axes[0])
        names = ", ".join(chunk)
        out.append(FigureData(
            f"probes-{slug(dataset)}-{k}.png", _render(fig),
            f"{dataset}: whole-model probe metrics ({names}) over training. Lines: mean over "
            "the seeds that recorded probes; bands: minimum to maximum; log axis where the "
            "values span more than a decade." + DIVERGED_NOTE + note,
            f"Probe metrics {names} on {dataset}"))
    return out
