"""The analysis step between a study's runs and its report: the prediction comparison of the
arms a study selects (`analysis.compare` in its spec), computed once from the checkpoints and
stored beside the runs, where the report reads it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bnlab.infer.compare import compare_runs
from bnlab.report.arms import INCLUDED, build_arms
from bnlab.report.load import load_study
from bnlab.runtime import resolve_device
from bnlab.store import FINISHED


def compare_selected(root: str | Path, log: Callable[[str], None] = print) -> None:
    """analysis.compare: compare the predictions of the selected arms (bnlab.infer.compare),
    one finished run per arm (its lowest seed), into OUT/analysis/ for the study's first
    dataset with two such arms and OUT/analysis/<dataset>/ for the others. Skipped when the
    spec does not ask for it, while some run has not ended, and when the comparison of the
    same runs exists; a failure is logged, never raised."""
    study = load_study(root)
    store = study.store
    ended = all(r.status in (*FINISHED, "failed") for r in study.runs)
    if not study.analysis.get("compare") or not study.runs or not ended:
        return
    arms = [a for a in build_arms(study) if a.selected]
    device = resolve_device((study.runs[0].config or {}).get("device", "auto")).type
    first = True
    for dataset in dict.fromkeys(a.dataset for a in arms):
        picks = []
        for a in arms:
            done = [r for r in a.runs if a.dataset == dataset and r.status in INCLUDED
                    and store.run(r.run_id).checkpoint_path.is_file()]
            if done:
                run = min(done, key=lambda r: (str(r.seed), r.run_id))
                picks.append((run.run_id, a.label))
        if len(picks) < 2:
            continue
        folder = store.root / "analysis" if first else store.root / "analysis" / dataset
        first = False
        old = store.read_meta(str((folder / "compare.json").relative_to(store.root))) \
            if (folder / "compare.json").is_file() else None
        if old and [m["run_id"] for m in old.get("models", [])] == [p[0] for p in picks]:
            continue
        log(f"comparing the predictions of {len(picks)} arms on {dataset}: "
            + ", ".join(label for _, label in picks))
        try:
            compare_runs([store.run(rid) for rid, _ in picks], folder,
                         labels=[label for _, label in picks], device=device, log=log)
        except Exception as e:  # noqa: BLE001 - the runs are the result; the comparison is extra
            log(f"prediction comparison on {dataset} failed: {type(e).__name__}: {e}")
