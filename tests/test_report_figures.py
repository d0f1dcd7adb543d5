"""Report figures of the training curves, read back as matplotlib objects on a study written
straight into a store: an arm whose runs all diverged is a marker where it diverged, in the
panels and named in the legend, never data."""

from __future__ import annotations

import matplotlib
import pytest
from helpers import write_study_meta

from bnlab.config import RunConfig
from bnlab.report import figures as F
from bnlab.report.arms import build_arms
from bnlab.report.load import load_study
from bnlab.store import Store

STEPS_PER_EPOCH = 8


def write_study(out, diverged_steps=(2, 3)):
    """norm=bn: 2 seeds, 2 epochs of 8 steps; norm=none: every seed diverged at the given
    steps of its first epoch (no metrics rows)."""
    store = Store(out)
    entries = []
    for norm, seeds in (("bn", (0, 1)), ("none", (0, 1))):
        for seed in seeds:
            cfg = RunConfig(dataset="synthetic", norm=norm, seed=seed, epochs=2)
            run = store.run(cfg.run_id())
            run.write_json("config.json", {"config": cfg.to_dict()})
            if norm == "none":
                summary = {"status": "diverged", "diverged_step": diverged_steps[seed],
                           "epochs_done": 0}
                rows = []
            else:
                summary = {"status": "completed", "test_acc": 0.5, "train_acc": 0.6,
                           "epochs_done": 2}
                rows = [{"epoch": e, "step": e * STEPS_PER_EPOCH, "test_acc": 0.3 + 0.1 * e,
                         "train_acc": 0.6, "train_loss": 2.0 / e, "test_loss": 1.1}
                        for e in (1, 2)]
            run.write_json("summary.json", summary)
            run.write_rows("metrics.jsonl", rows)
            entries.append({"run_id": cfg.run_id(),
                            "values": {"norm": norm, "seed": seed, "dataset": "synthetic"}})
    write_study_meta(store, entries)


@pytest.fixture
def figures(monkeypatch):
    drawn = []
    real = F._render
    monkeypatch.setattr(F, "_render", lambda fig: drawn.append(fig) or real(fig))
    return drawn


def test_a_diverged_arm_is_a_line_where_it_diverged_in_both_panels(tmp_path, figures):
    write_study(tmp_path)
    F.curves("synthetic", build_arms(load_study(tmp_path)))
    (fig,) = figures
    for ax in fig.axes[:2]:
        marks = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        # step 2 and step 3 of an 8-step epoch, in epochs
        assert sorted(float(m.get_xdata()[0]) for m in marks) == [2 / 8, 3 / 8]
        for m in marks:
            assert len(set(m.get_xdata())) == 1  # vertical: not a curve of values
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "norm=none: 2 diverged at step 2, 3 (not drawn)" in labels
    assert "norm=bn (n=2)" in labels


def test_the_gap_figure_marks_a_diverged_arm_in_the_colour_of_the_curves(tmp_path, figures):
    write_study(tmp_path)
    arms = build_arms(load_study(tmp_path))
    F.curves("synthetic", arms)
    F.gap_curves("synthetic", arms)
    curves, gap = figures
    (ax,) = gap.axes
    marks = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(float(m.get_xdata()[0]) for m in marks) == [2 / 8, 3 / 8]

    def colours(fig):
        return {str(t.get_text()).split(":")[0].split(" (")[0]: h.get_color()
                for t, h in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles)}

    assert colours(gap) == colours(curves)
    assert set(colours(gap)) == {"norm=bn", "norm=none"}


def test_an_arm_whose_test_loss_went_non_finite_is_marked_after_that_epoch(tmp_path, figures):
    write_study(tmp_path)
    for summary in tmp_path.rglob("summary.json"):  # no BN: a non-finite test loss only
        if '"diverged"' in summary.read_text():
            summary.write_text('{"status": "diverged", "epochs_done": 2, '
                               '"test_loss_nonfinite_epoch": 2}')
    F.curves("synthetic", build_arms(load_study(tmp_path)))
    (fig,) = figures
    marks = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert [float(m.get_xdata()[0]) for m in marks] == [2.0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "norm=none: 2 diverged after epoch 2 (test loss non-finite) (not drawn)" in labels


def test_a_legend_of_long_arm_labels_stays_inside_a_narrow_figure(figures):
    from matplotlib.figure import Figure

    long = "norm=none, init=kaiming, warmup_epochs=0: diverged after epoch 2 (test loss " \
           "non-finite) (not drawn)"
    with matplotlib.rc_context(F.STYLE):
        fig = Figure(figsize=(F.WIDTH * 2 / 3, 2.6), layout="constrained")
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], label="norm=bn, init=kaiming, warmup_epochs=0 (n=1)")
        ax.axvline(0.5, linestyle="--", label=long)
        F._legend_below(fig, ax)
        F._render(fig)
    (fig,) = figures
    box = fig.legends[0].get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width
    assert any("\n" in t.get_text() for t in fig.legends[0].get_texts())
