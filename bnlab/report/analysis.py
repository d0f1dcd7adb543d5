"""The analysis step between a study's runs and its report: the prediction comparison of the
arms a study selects (`analysis.compare` in its spec), computed once from the checkpoints and
stored beside the runs, where the report reads it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bnlab.infer.compare import compare_runs
from bnlab.infer.seeds import FORMAT
from bnlab.report.arms import build_arms, compare_picks, compare_skip
from bnlab.report.load import load_study
from bnlab.runtime import resolve_device
from bnlab.store import FINISHED


def compare_selected(root: str | Path, log: Callable[[str], None] = print) -> None:
    """analysis.compare: compare the predictions of the selected arms (bnlab.infer.compare)
    with every finished run of each arm (all its seeds, so that between-arm numbers come with
    the within-arm baseline), into OUT/analysis/ for the study's first dataset with two such
    arms and OUT/analysis/<dataset>/ for the others; with analysis.corruptions = false without
    the corruption sweep (and its AdaBN passes). Skipped when the spec does not ask for it,
    while some run has not ended, and when a comparison of the same runs in the current format
    exists; each run's predictions are cached in its folder, so adding seeds later predicts only
    the new runs. A failure is logged, never raised."""
    study = load_study(root)
    store = study.store
    ended = all(r.status in (*FINISHED, "failed") for r in study.runs)
    if not study.analysis.get("compare") or not study.runs or not ended:
        return
    arms = [a for a in build_arms(study) if a.selected]
    device = resolve_device((study.runs[0].config or {}).get("device", "auto")).type
    first = True
    for dataset in dict.fromkeys(a.dataset for a in arms):
        picks = [(r.run_id, label) for r, label in compare_picks(
            arms, dataset, lambda r: store.run(r.run_id).checkpoint_path.is_file())]
        why = compare_skip(arms, dataset, [label for _, label in picks])
        if why:
            log(why[0].upper() + why[1:])
            continue
        folder = store.root / "analysis" if first else store.root / "analysis" / dataset
        first = False
        old = store.read_meta(str((folder / "compare.json").relative_to(store.root))) \
            if (folder / "compare.json").is_file() else None
        if old and old.get("format") == FORMAT and \
                {(r.get("run_id"), r.get("arm")) for r in old.get("runs", [])} == set(picks):
            continue
        arms_n = {label: sum(1 for _, lb in picks if lb == label) for _, label in picks}
        log(f"comparing the predictions of {len(arms_n)} arms on {dataset} ("
            + ", ".join(f"{label}: {n} runs" for label, n in arms_n.items()) + ")")
        try:
            compare_runs([store.run(rid) for rid, _ in picks], folder,
                         labels=[label for _, label in picks], device=device,
                         corruptions=bool(study.analysis.get("corruptions", True)), log=log)
        except Exception as e:  # noqa: BLE001 - the runs are the result; the comparison is extra
            log(f"prediction comparison on {dataset} failed: {type(e).__name__}: {e}")
