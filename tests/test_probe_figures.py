"""Probe figures that stay readable when an arm diverges, on a study written straight into a
store: the diverged arm is a marker or a note, never data; values spanning decades get a log
axis; titles fit their panels; whole-model metrics fill their figures; a one-probe arm has no
drift in the findings."""

from __future__ import annotations

import pytest
from helpers import write_study_meta

from bnlab.config import RunConfig
from bnlab.report.arms import build_arms
from bnlab.report.compose import compose
from bnlab.report.load import load_study
from bnlab.report.probe_figures import (
    TITLE_CHARS,
    _rows_of,
    grad_norms,
    ics,
    model_probe_metrics,
    percentiles,
    unit_percentile_figure,
)
from bnlab.report.tables import probe_rows
from bnlab.store import Store

LAYER = "blocks.8.n2"
STEPS = [0, 10, 20, 30]
HUGE = 1.6e24  # a diverged run's last probe values


def _rows(steps, scale):
    rows = []

    def add(step, layer, metric, value, unit=None):
        rows.append({"step": step, "epoch": 1, "layer": layer, "metric": metric,
                     "value": value, **({} if unit is None else {"unit": unit})})

    for step in steps:
        for q in (15, 50, 85):
            add(step, LAYER, f"act_p{q}", scale * (q - 50) / 35)
            add(step, LAYER, f"unit_p{q}", scale * (q - 50) / 35 + 0.01 * step, 3)
        for layer in ("conv1", "fc"):
            add(step, layer, "grad_norm", scale * (1 + step))
            add(step, layer, "ics_l2", scale * 10.0 ** (-step / 10))
            add(step, layer, "ics_cos", 0.5)
        for metric in ("grad_norm", "weight_norm", "loss_variation_abs", "grad_predictiveness_abs",
                       "beta_smoothness_abs"):
            add(step, "", metric, scale * 10.0 ** (-step / 10))
    return rows


def write_study(out):
    store = Store(out)
    entries = []
    for norm, seeds in (("bn", (0, 1)), ("none", (0,))):
        for seed in seeds:
            cfg = RunConfig(dataset="synthetic", norm=norm, seed=seed, probe_every=10)
            run = store.run(cfg.run_id())
            run.write_json("config.json", {"config": cfg.to_dict()})
            diverged = norm == "none"
            summary = {"status": "diverged", "diverged_step": 2, "epochs_done": 0} if diverged \
                else {"status": "completed", "test_acc": 0.5, "train_acc": 0.6, "epochs_done": 1}
            run.write_json("summary.json", summary)
            run.write_rows("metrics.jsonl", [] if diverged else [
                {"epoch": 1, "step": 30, "test_acc": 0.5, "train_acc": 0.6, "train_loss": 1.0,
                 "test_loss": 1.1}])
            run.write_rows("probes.jsonl", _rows([0], HUGE) if diverged else _rows(STEPS, 1.0))
            entries.append({"run_id": cfg.run_id(),
                            "values": {"norm": norm, "seed": seed, "dataset": "synthetic"}})
    write_study_meta(store, entries)


@pytest.fixture
def arms(tmp_path):
    write_study(tmp_path)
    return build_arms(load_study(tmp_path))


def test_a_diverged_arm_is_a_marker_not_data(arms, monkeypatch):
    import bnlab.report.probe_figures as P

    figs = []
    real = P._render
    monkeypatch.setattr(P, "_render", lambda fig: figs.append(fig) or real(fig))
    ics("synthetic", arms)
    model_probe_metrics("synthetic", arms)
    assert len(figs) == 1 + 2  # ICS; five metrics as 3 + 2 panels
    for fig in figs:
        for ax in fig.axes:
            if not ax.get_visible() or not ax.get_lines():
                continue
            ys = [y for line in ax.get_lines() for y in line.get_ydata()]
            assert max(abs(float(y)) for y in ys if y == y) < 1e3  # never the 1e24 values
            marks = [line for line in ax.get_lines()
                     if "diverged at step 2" in str(line.get_label())]
            assert len(marks) == 1 and list(marks[0].get_xdata()) == [2, 2]
    # the values that span decades (10^0 .. 10^-3) are on a log axis, cos(G, G') is not
    by_title = {ax.get_title(): ax for fig in figs for ax in fig.axes}
    assert by_title["ICS: ‖G − G′‖₂ (mean over layers)"].get_yscale() == "log"
    assert by_title["ICS: cos(G, G′) (mean over layers)"].get_yscale() == "linear"
    assert by_title["loss_variation_abs"].get_yscale() == "log"
    # the five metrics fill their figures: no hidden panel
    assert [len(fig.axes) for fig in figs[1:]] == [3, 2]
    assert all(ax.get_visible() for fig in figs for ax in fig.axes)


def test_per_arm_panels_of_a_diverged_arm_say_why_they_are_empty(arms, monkeypatch):
    import bnlab.report.probe_figures as P

    figs = []
    real = P._render
    monkeypatch.setattr(P, "_render", lambda fig: figs.append(fig) or real(fig))
    rows = probe_rows(arms)
    percentiles("synthetic", rows)
    grad_norms("synthetic", arms)
    fig, _ = unit_percentile_figure("synthetic", rows)
    figs.append(fig)
    # the diverged arm's note first: the row's scale moves to the next panel
    first, _ = unit_percentile_figure("synthetic", rows,
                                      list(reversed(P._unit_columns("synthetic", rows))))
    P._render(first)
    for fig in figs:  # every row's first drawn panel carries the y label
        rows = {}
        for ax in fig.axes:
            if ax.get_visible() and ax.axison:
                rows.setdefault(round(ax.get_position().y0, 3), []).append(ax)
        for row in rows.values():
            assert min(row, key=lambda ax: ax.get_position().x0).get_ylabel()
    for fig in figs:
        empty = [ax for ax in fig.axes if ax.get_visible() and not ax.axison]
        assert len(empty) == 1  # the no-BN arm's panel
        (note,) = empty[0].texts
        assert "diverged at step 2" in note.get_text() and not empty[0].get_lines()
        for ax in fig.axes:  # the drawn panels hold the bn run's values only
            assert all(abs(float(y)) < 1e3 for line in ax.get_lines() for y in line.get_ydata())
        panels = fig.axes[0].get_gridspec().get_geometry()[1]  # columns
        for ax in fig.axes:  # wrapped to the panel's share of the width
            for line in ax.get_title().split("\n"):
                assert len(line) <= max(12, TITLE_CHARS // panels)


def test_panels_per_figure_are_even():
    assert [_rows_of(n) for n in (1, 2, 3, 4, 5, 7)] == [[1], [2], [3], [2, 2], [3, 2],
                                                         [3, 2, 2]]


def test_a_diverged_arm_has_no_drift_in_the_findings(tmp_path):
    write_study(tmp_path)
    text = " ".join(str(b) for b in compose(load_study(tmp_path)).document.blocks)
    assert "norm=none has none (seed 0: diverged at step 2, 1 probe step)" in text
    assert "+0.000 in norm=none" not in text


def test_per_unit_figures_hold_at_most_a_row_of_arms(tmp_path, monkeypatch):
    """Six arms are drawn as two figures of 3 arms, not squeezed into one row whose titles run
    into each other."""
    import bnlab.report.probe_figures as P
    from bnlab.report.probe_figures import PANELS_PER_ROW, unit_percentiles

    store = Store(tmp_path)
    entries = []
    for lr in (0.01, 0.02, 0.04, 0.08, 0.16, 0.32):
        cfg = RunConfig(dataset="synthetic", norm="bn", lr=lr, seed=0, probe_every=10)
        run = store.run(cfg.run_id())
        run.write_json("config.json", {"config": cfg.to_dict()})
        run.write_json("summary.json", {"status": "completed", "test_acc": 0.5,
                                        "train_acc": 0.6, "epochs_done": 1})
        run.write_rows("metrics.jsonl", [{"epoch": 1, "step": 30, "test_acc": 0.5,
                                          "train_acc": 0.6, "train_loss": 1.0,
                                          "test_loss": 1.1}])
        run.write_rows("probes.jsonl", _rows(STEPS, 1.0))
        entries.append({"run_id": cfg.run_id(),
                        "values": {"lr": lr, "seed": 0, "dataset": "synthetic"}})
    store.write_meta("study.json", {"name": "many", "description": "", "spec": {},
                                    "sets": {}, "only": {}, "data_map": {},
                                    "axes": ["lr"], "runs": entries,
                                    "analysis": {"baseline": {"lr": 0.01}}})
    figs = []
    real = P._render
    monkeypatch.setattr(P, "_render", lambda fig: figs.append(fig) or real(fig))
    made = unit_percentiles("synthetic", probe_rows(build_arms(load_study(tmp_path))))
    assert [f.file for f in made] == ["unit-percentiles-synthetic-1.png",
                                      "unit-percentiles-synthetic-2.png"]
    columns = [fig.axes[0].get_gridspec().get_geometry()[1] for fig in figs]
    assert columns == [3, 3] and max(columns) <= PANELS_PER_ROW
    titles = {ax.get_title().split(":")[0] for fig in figs for ax in fig.axes}
    assert len(titles) == 6  # every arm drawn once


def test_a_row_that_starts_with_a_note_panel_keeps_its_y_scale():
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from bnlab.report.figures import STYLE, _panels
    from bnlab.report.probe_figures import label_rows, note_panel

    with matplotlib.rc_context(STYLE):
        fig, axes = _panels(7)  # 4 + 3, y shared
        for ax in axes:
            ax.plot([0, 1], [1, 2])
        note_panel(axes[4], "diverged at step 2")  # the first panel of the second row
        label_rows(axes, "gradient norm")
        FigureCanvasAgg(fig).draw()
    assert axes[5].get_ylabel() == "gradient norm" and axes[0].get_ylabel() == "gradient norm"
    assert [ax.get_ylabel() for ax in axes] == ["gradient norm", "", "", "", "",
                                                "gradient norm", ""]
    assert any(t.get_visible() and t.get_text() for t in axes[5].get_yticklabels())
    assert not any(t.get_visible() and t.get_text() for t in axes[1].get_yticklabels())


@pytest.mark.parametrize("values, scale, linthresh", [
    ([0.35, 3.4, 587.0], "log", None),           # positive, over three decades
    ([0.0, 0.0, 0.0234, 0.34, 587.0], "symlog", 0.01),  # a vanished gradient among them
    ([0.0, 1.0, 5.0], "linear", None),           # zero, but the rest within a decade
    ([2.0, 9.0], "linear", None),
    ([-1.0, 0.5, 100.0], "linear", None),        # signed values stay linear
])
def test_values_over_decades_get_a_log_axis_even_with_zeros_among_them(values, scale,
                                                                        linthresh):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bnlab.report.figures import _log_if_wide

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(range(len(values)), values)
    _log_if_wide(ax, values)
    assert ax.get_yscale() == scale
    if linthresh is not None:
        assert ax.yaxis.get_transform().linthresh == pytest.approx(linthresh)
        fig.canvas.draw()
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert "0" in labels and "100" in labels  # zero is drawn, and the decades above it
        assert ax.get_ylim()[0] == 0.0 and not any(x.startswith(("-", "−")) for x in labels)


def test_a_log_axis_over_little_more_than_a_decade_keeps_enough_labelled_ticks():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bnlab.report.figures import _log_if_wide

    # a train loss from 2.3 to 40.6 (lr-sweep at CPU scale): 1-2-5 ticks left 5, 10, 20 only
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    values = [2.31, 3.84, 27.6, 40.56]
    ax.plot(range(4), values)
    _log_if_wide(ax, values)
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    shown = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert [round(t) for t in shown] == [3, 5, 10, 20, 30]
    labels = [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]
    assert labels == ["3", "5", "10", "20", "30"]


@pytest.mark.parametrize("n, rows", [(1, [1]), (4, [4]), (5, [3, 2]), (6, [3, 3]),
                                     (7, [4, 3]), (9, [3, 3, 3]), (10, [4, 4, 2])])
def test_panels_fill_their_rows_as_evenly_as_the_row_count_allows(n, rows):
    from bnlab.report.figures import _panels

    fig, axes = _panels(n)
    assert len(axes) == n and all(ax.get_visible() for ax in axes)
    per_row: dict[int, int] = {}
    for ax in axes:
        start = ax.get_subplotspec().rowspan.start
        per_row[start] = per_row.get(start, 0) + 1
    assert [per_row[k] for k in sorted(per_row)] == rows
    hidden = [ax for ax in fig.axes if not ax.get_visible()]
    assert len(hidden) == len(rows) * max(rows) - n


def test_log_tick_labels_are_plain_near_one_and_powers_of_ten_beyond():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bnlab.report.figures import _log_if_wide, tick_label

    assert [tick_label(v) for v in (0.001, 0.05, 1.0, 200.0, 9999.0)] == [
        "0.001", "0.05", "1", "200", "9999"]
    assert [tick_label(v) for v in (1e4, 1e8, 2e5, 5e-4)] == [
        "$10^{4}$", "$10^{8}$", r"$2\times10^{5}$", r"$5\times10^{-4}$"]
    # a whole-model metric from 100 to 10^8 (vgg-bn at CPU scale): no '1e+08' beside '10000'
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    values = [80.0, 1e4, 9e7]
    ax.plot(range(3), values)
    _log_if_wide(ax, values)
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi]
    assert labels == ["100", "1000", "$10^{4}$", "$10^{5}$", "$10^{6}$", "$10^{7}$", "$10^{8}$"]
