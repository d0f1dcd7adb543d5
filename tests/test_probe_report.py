"""The probe part of a study report, on a study written straight into a store (no training):
per-unit percentile curves side by side for the arms, the pooled view after them, and arms
compared only on smoothness measured at absolute step sizes they share."""

from __future__ import annotations

import pytest

from bnlab.config import RunConfig
from bnlab.report.compose import compose
from bnlab.report.load import load_study
from bnlab.report.probe_figures import unit_percentile_figure
from bnlab.report.probedata import series, units_of
from bnlab.report.tables import probe_rows
from bnlab.store import Store

STEPS = [0, 10, 20, 30]
UNITS = {0: [4, 17, 80], 1: [2, 9, 51]}  # per seed, as a prober would choose them
LAYER = "hidden.2.sigmoid"


def unit_value(norm: str, seed: int, unit: int, q: int, step: int) -> float:
    """Planted per-unit percentiles: each unit sits at its own level, a no-BN unit drifts."""
    drift = 0.0 if norm == "bn" else 0.05 * step
    return unit / 10 + (q - 50) / 35 + drift + seed


def probe_rows_of(norm: str, seed: int) -> list[dict]:
    rows = []

    def add(step, layer, metric, value, unit=None):
        row = {"step": step, "epoch": 1 + step // 20, "layer": layer, "metric": metric,
               "value": value}
        if unit is not None:
            row["unit"] = unit
        rows.append(row)

    for step in STEPS:
        for q in (15, 50, 85):
            add(step, LAYER, f"act_p{q}", (q - 50) / 20)
            for u in UNITS[seed]:
                add(step, LAYER, f"unit_p{q}", unit_value(norm, seed, u, q, step), u)
        for metric in ("loss_variation", "beta_smoothness"):
            for suffix in ("lr", "abs"):
                add(step, "", f"{metric}_{suffix}", 0.1 * step + 1)
        add(step, "", "grad_norm", 1.0 / (1 + step))
    return rows


def write_study(out, step_sizes: dict[str, str]) -> None:
    store = Store(out)
    entries = []
    for norm in ("bn", "none"):
        for seed in (0, 1):
            cfg = RunConfig(dataset="synthetic", model="mlp3x100", norm=norm, seed=seed,
                            probe_every=10, probe_step_sizes=step_sizes[norm])
            run = store.run(cfg.run_id())
            run.write_json("config.json", {"config": cfg.to_dict()})
            run.write_json("summary.json", {"status": "completed", "test_acc": 0.9,
                                            "train_acc": 0.95, "epochs_done": 2})
            run.write_rows("metrics.jsonl", [
                {"epoch": e, "step": 20 * e, "test_acc": 0.9, "train_acc": 0.95,
                 "train_loss": 0.3, "test_loss": 0.35} for e in (1, 2)])
            run.write_rows("probes.jsonl", probe_rows_of(norm, seed))
            entries.append({"run_id": cfg.run_id(),
                            "values": {"norm": norm, "seed": seed, "dataset": "synthetic"}})
    spec = {"name": "probes", "base": {"dataset": "synthetic"},
            "grid": {"norm": ["bn", "none"], "seed": [0, 1]}}
    store.write_meta("study.json", {"name": "probes", "description": "", "spec": spec,
                                    "sets": {}, "only": {}, "data_map": {},
                                    "axes": ["norm", "seed"], "runs": entries,
                                    "analysis": {"baseline": {"norm": "bn"}}})


@pytest.fixture
def shared(tmp_path):
    write_study(tmp_path, {"bn": "0.005,0.05,0.5", "none": "0.005,0.05,0.5"})
    return load_study(tmp_path)


def test_unit_series_read_back():
    rows = probe_rows_of("none", 1)
    assert units_of(rows, LAYER) == UNITS[1]
    assert series(rows, LAYER, "unit_p85", 9) == (
        STEPS, [unit_value("none", 1, 9, 85, s) for s in STEPS])
    assert series(rows, LAYER, "act_p85")[1] == [1.75] * len(STEPS)  # pooled rows only


def test_unit_figure_draws_each_units_percentiles_side_by_side(shared):
    from bnlab.report.arms import build_arms

    fig, caption = unit_percentile_figure("synthetic", probe_rows(build_arms(shared)))
    grid = [ax for ax in fig.axes if ax.get_visible()]
    assert len(grid) == 3 * 2  # a row per unit, a column per arm
    for i, ax in enumerate(fig.axes):
        row, col = divmod(i, 2)
        norm = ("bn", "none")[col]
        unit = UNITS[0][row]  # the lowest seed's run of each arm
        assert ax.get_title().endswith(f"unit {unit}") and f"norm={norm}" in ax.get_title()
        for line, q in zip(ax.get_lines(), (15, 50, 85)):
            assert list(line.get_xdata()) == STEPS
            assert list(line.get_ydata()) == pytest.approx(
                [unit_value(norm, 0, unit, q, s) for s in STEPS])
    assert "units 4, 17, 80" in caption and "seed 0" in caption


def test_report_shows_units_then_pooled_and_compares_only_absolute_smoothness(shared):
    composed = compose(shared)
    figs = [b for b in composed.document.blocks if type(b).__name__ == "Figure"]
    files = [f.file for f in figs]
    assert files.index("unit-percentiles-synthetic.png") + 1 == \
        files.index("percentiles-synthetic.png")
    assert composed.images["unit-percentiles-synthetic.png"][:4] == b"\x89PNG"
    model = [f for f in figs if f.file.startswith("probes-synthetic")]
    shown = " ".join(f.alt for f in model)
    assert "loss_variation_abs" in shown and "beta_smoothness_abs" in shown
    assert "_lr" not in shown
    caption = " ".join(f.caption for f in model)
    assert "0.005, 0.05, 0.5 shared by every arm" in caption
    assert "loss_variation_lr" in caption  # named as left out


def test_absolute_smoothness_is_not_compared_when_arms_used_different_steps(tmp_path):
    write_study(tmp_path, {"bn": "0.005,0.05,0.5", "none": "0.1"})
    composed = compose(load_study(tmp_path))
    model = [b for b in composed.document.blocks
             if type(b).__name__ == "Figure" and b.file.startswith("probes-synthetic")]
    assert "_abs" not in " ".join(f.alt for f in model)
    assert "differ between the arms" in " ".join(f.caption for f in model)


def test_drift_is_the_change_between_the_ends_of_the_planted_series(shared):
    """4 probes: one at each end (drift_window); a no-BN unit moves by 0.05 per step over the
    30 steps, a BN unit and the pooled percentiles not at all."""
    from bnlab.report.arms import build_arms

    rows = {p.arm.label: p for p in probe_rows(build_arms(shared))}
    assert set(rows) == {"norm=bn", "norm=none"}
    for label, moved in (("norm=bn", 0.0), ("norm=none", 0.05 * 30)):
        p = rows[label]
        assert p.window == 1 and p.unit_change.n == 2
        assert p.unit_change.mean == pytest.approx(moved) and p.unit_change.sd == \
            pytest.approx(0.0, abs=1e-12)
        assert p.p50_change.mean == pytest.approx(0.0) and p.width_change.mean == \
            pytest.approx(0.0)
        for d in p.drifts:
            assert d.first["act_p85"] == pytest.approx(35 / 20) == d.last["act_p85"]
    text = " ".join(str(b) for b in compose(shared).document.blocks)
    assert "from the first probe to the last" in text
    assert "a single unit's median 1.500 ± 0.000 either way" in text
