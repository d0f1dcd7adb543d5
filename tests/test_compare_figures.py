"""The comparison figures read back as matplotlib objects: panel titles name the arm as the
report's tables do."""

from __future__ import annotations

import bnlab.infer.compare_figures as C


def _result(labels):
    edges = [i / 4 for i in range(5)]
    runs, arms = [], []
    for i, label in enumerate(labels):
        runs.append({"run_id": f"r{i}", "arm": label,
                     "reliability": {"edges": edges, "count": [1, 2, 3, 4],
                                     "acc": [0.1, 0.3, 0.6, 0.9],
                                     "conf": [0.1, 0.4, 0.6, 0.9]},
                     "confidence_hist": {"edges": edges, "count": [1, 2, 3, 4]}})
        arms.append({"label": label, "runs": [f"r{i}"], "ece": {"mean": 0.05, "sd": None},
                     "n": 1})
    return {"arms": arms, "runs": runs}


def test_reliability_titles_keep_one_space_after_each_comma(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(C, "_save", lambda fig, path: saved.append((path.name, fig)))
    C.write_figures(_result(["norm=bn, init=kaiming", "norm=none,init=fixup"]), tmp_path)
    fig = dict(saved)["reliability.png"]
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes]
    assert titles == ["norm=bn, init=kaiming", "norm=none, init=fixup"]


def test_the_confidence_legend_sits_under_the_axes_not_on_the_curves(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(C, "_save", lambda fig, path: saved.append((path.name, fig)))
    C.write_figures(_result(["norm=bn", "norm=none"]), tmp_path)
    fig = dict(saved)["confidence.png"]
    (ax,) = fig.axes
    assert ax.get_legend() is None and len(fig.legends) == 1
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert legend.y1 <= ax.get_window_extent().y0  # wholly below the axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["norm=bn (n = 1)",
                                                                 "norm=none (n = 1)"]


def test_corruption_accuracies_are_drawn_in_percent(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(C, "_save", lambda fig, path: saved.append((path.name, fig)))
    result = _result(["norm=bn"])
    point = {"mean": 0.42, "sd": 0.01}
    result["arms"][0].update(test_acc={"mean": 0.9, "sd": 0.02},
                             corruption_acc={"by_severity": {"contrast": [point] * 5}})
    C.write_figures(result, tmp_path)
    fig = dict(saved)["corruptions.png"]
    (line,) = fig.axes[0].get_lines()[:1]
    assert list(line.get_ydata()) == [90.0, 42.0, 42.0, 42.0, 42.0, 42.0]
    assert fig.axes[0].get_ylabel() == "test accuracy (%, mean ± sd over seeds)"
