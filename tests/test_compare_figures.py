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
