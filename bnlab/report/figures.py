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
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from bnlab.report.arms import INCLUDED, Arm
from bnlab.report.load import Run, number
from bnlab.report.tables import arm_label
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


def columns(n: int, per_row: int = PANELS_PER_ROW) -> int:
    """Columns of a grid of n panels: as few rows as `per_row` allows, filled as evenly as
    possible (5 panels: 3 + 2, not 4 + 1 with three quarters of a row blank)."""
    rows = -(-max(1, n) // per_row)
    return -(-max(1, n) // rows)


def _panels(n: int, sharey: bool = True, per_row: int = PANELS_PER_ROW):
    """n panels in rows of `columns(n, per_row)`; unused axes of the last row hidden."""
    cols = columns(n, per_row)
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
    if ax is None:  # no panel has data
        return
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    # As many columns as fit the figure's width: ~0.55 em per character plus the line sample;
    # a label longer than the whole width is wrapped, so no entry runs past the figure's edge.
    size = matplotlib.rcParams["legend.fontsize"]
    size = size if isinstance(size, int | float) else 7.0
    width = fig.get_figwidth() * 72
    chars = max(12, int((width - 5 * size) / (0.55 * size)))
    labels = ["\n".join(textwrap.wrap(x, chars)) or x for x in labels]
    longest = max(len(line) for x in labels for line in x.split("\n"))
    per_entry = longest * 0.55 * size + 4 * size
    fits = int(width // per_entry)
    fig.legend(handles, labels, loc="outside lower center", frameon=False,
               ncol=max(1, min(3, len(handles), fits)))


def _epochs_axis(ax) -> None:
    """Integer ticks; a panel whose points all sit at one x is centred on it."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    xs = {float(x) for line in ax.get_lines() for x in line.get_xdata()}
    if len(xs) == 1:
        (x,) = xs
        ax.set_xlim(x - 1, x + 1)


def tick_label(v: float) -> str:
    """A log axis's tick: plain from 0.001 to 9999 ('0.05', '200'); a power of ten beyond as
    10^k and other values as m×10^k, not '1e+08' beside '10000'."""
    a = abs(v)
    if a == 0 or 1e-3 <= a < 1e4:
        return f"{v:g}"
    e = math.floor(math.log10(a) + 1e-9)
    m = round(v / 10.0 ** e, 6)
    return f"$10^{{{e}}}$" if m == 1 else f"${m:g}\\times10^{{{e}}}$"


def _log_if_wide(ax, values: list[float]) -> None:
    """Log scale only when the positive values span more than a decade; plain tick labels at
    1, 2, 3 and 5 times each power of ten under two decades, 1, 2 and 5 under three, at the
    powers of ten above (a narrow span keeps enough labelled ticks). Values of exactly 0 among
    them (a layer whose gradient vanished) would keep a log axis from being drawn: those get a
    symlog axis, linear from 0 up to the power of ten below the smallest positive value and
    logarithmic above it. Negative values: left linear."""
    pos = [v for v in values if v > 0]
    if not pos or min(values) < 0 or max(pos) / min(pos) <= 10:
        return
    span = max(pos) / min(pos)
    plain = FuncFormatter(lambda v, _: tick_label(v))
    if len(pos) == len(values):
        ax.set_yscale("log")
        # under two decades, 1-2-5 can leave three ticks (2.3 to 40: 5, 10, 20); add 3
        subs = (1.0, 2.0, 3.0, 5.0) if span < 1e2 else (1.0, 2.0, 5.0) if span < 1e3 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(subs=subs))
    else:
        ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(min(pos))),
                      linscale=0.5)
        ax.set_ylim(bottom=0.0)  # nothing is negative: no mirrored decades below 0
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(NullFormatter())


def _included(a: Arm) -> list[Run]:
    return [r for r in a.runs if r.status in INCLUDED]


@styled
def curves(dataset: str, arms: list[Arm]) -> list[FigureData]:
    shown = [a for a in arms if a.selected and _included(a)]
    if not shown:
        return []
    ordered = [a for a in arms if a.selected and (_included(a) or a.count("diverged"))]
    fig, (ax_acc, ax_loss) = _new(2, height=3.0)
    losses = []
    for a, color in zip(ordered, _colors(len(ordered))):  # colours in arm order, as elsewhere
        if not _included(a):  # every run diverged: a marker where it did, no data
            _mark_diverged([ax_acc, ax_loss], a, arms, color)
            continue
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
        "table); n per arm in the legend. An arm whose runs all diverged is a dashed "
        "vertical line at the epoch (fraction) where it diverged.",
        f"Training curves on {dataset}")]


# the config keys that fix how many steps make an epoch
EPOCH_KEYS = ("batch_size", "limit_train", "val_fraction", "dataset")


def steps_per_epoch(run: Run, arms: list[Arm]) -> float | None:
    """Steps of one epoch of `run`, from a run of these arms with the same data and batch
    size that finished an epoch (a run that diverged in its first epoch recorded none)."""
    key = tuple(run.value(k) for k in EPOCH_KEYS)
    for a in arms:
        for r in a.runs:
            if tuple(r.value(k) for k in EPOCH_KEYS) != key:
                continue
            for m in r.metrics:
                step, epoch = number(m.get("step")), number(m.get("epoch"))
                if step and epoch:
                    return step / epoch
    return None


def _diverged_x(run: Run, arms: list[Arm]) -> tuple[float, str]:
    """Where a diverged run goes on an epoch axis, and how it diverged: at its step as a
    fraction of an epoch, or after the epoch whose test loss was non-finite (a run that
    records neither: after its last finished epoch)."""
    s = run.summary
    step, per = number(s.get("diverged_step")), None
    if step is not None:
        per = steps_per_epoch(run, arms)
        if per:
            return step / per, f"at step {int(step)}"
    after = number(s.get("test_loss_nonfinite_epoch"))
    if after is not None:
        return after, f"after epoch {int(after)} (test loss non-finite)"
    done = number(s.get("epochs_done")) or 0.0
    return done, f"at step {int(step)}" if step is not None else f"after epoch {int(done)}"


def _mark_diverged(axes, a: Arm, arms: list[Arm], color) -> None:
    """An arm whose runs all diverged: a dashed vertical line in each panel at the epoch
    (fraction) where each of its runs diverged, named in the legend ("diverged at step N",
    or "after epoch E" where only the test loss was non-finite)."""
    gone = [r for r in a.runs if r.status == "diverged"]
    marks = [_diverged_x(r, arms) for r in gone]
    steps = sorted({int(w.split()[-1]) for _, w in marks if w.startswith("at step ")})
    other = sorted({w for _, w in marks if not w.startswith("at step ")})
    how = ([f"at step {', '.join(map(str, steps))}"] if steps else []) + other
    label = f"{arm_label(a)}: {len(gone)} diverged {'; '.join(how)} (not drawn)"
    for i, x in enumerate(sorted({x for x, _ in marks})):
        for ax in axes:
            ax.axvline(x, color=color, linestyle="--", linewidth=1.0,
                       label=label if ax is axes[0] and i == 0 else None)


@styled
def gap_curves(dataset: str, arms: list[Arm]) -> list[FigureData]:
    shown = [a for a in arms if a.selected and _included(a)]
    if not shown:
        return []
    ordered = [a for a in arms if a.selected and (_included(a) or a.count("diverged"))]
    fig, (ax,) = _new(1, height=3.0)
    for a, color in zip(ordered, _colors(len(ordered))):  # the colours of the curves figure
        if not _included(a):
            _mark_diverged([ax], a, arms, color)
            continue
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
        "accuracy after the epoch. Lines: mean over seeds; bands: minimum to maximum. An arm "
        "whose runs all diverged is a dashed vertical line where it diverged; colours as in "
        "the training curves.",
        f"Train-test gap on {dataset}")]


def _diff(a, b):
    a, b = number(a), number(b)
    return None if a is None or b is None else a - b
