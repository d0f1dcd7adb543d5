"""Prediction comparison of trained models on their common test set, over seeds.

`compare_runs(run_dirs, out_dir)` loads each run's checkpoint; `compare_models(loaded, ...)`
takes models already loaded (bnlab runs or a user's own). Runs with the same label form an
arm, one run per seed (by default the label names the config keys that differ between the
runs, the seed excepted). Every run is predicted once (bnlab.infer.predictions, cached in its
run folder); then every pair of runs is compared: between arms, all n_A x n_B pairs; within an
arm, all pairs of its seeds, the seed-to-seed baseline. compare.json (layout in
docs/inference.md) and figures go to OUT through the store. The metrics are defined in
bnlab.infer.metrics, the summaries over seeds and pairs in bnlab.infer.seeds.
"""

from __future__ import annotations

from pathlib import Path

from bnlab.config import NOT_ARM_KEYS
from bnlab.errors import UserError
from bnlab.infer import metrics as M
from bnlab.infer.compare_figures import write_figures
from bnlab.infer.compare_text import format_compare
from bnlab.infer.loading import Loaded, load_model
from bnlab.infer.predictions import run_predictions, test_fingerprint
from bnlab.infer.seeds import FORMAT, summarize_comparison
from bnlab.store import RunDir, atomic_write_json


def default_labels(loaded: list[Loaded]) -> list[str]:
    """'key=value,...' of the config keys that differ between the bnlab runs, except
    config.NOT_ARM_KEYS (the seed and options without effect on the model, the report's arms
    leave out the same), so seeds of one configuration share a label; 'norm=NAME' when only
    seeds differ. A user's model is labelled by its weights file (path_labels)."""
    configs = [ld.cfg.to_dict() for ld in loaded if ld.cfg is not None]
    keys = sorted(k for k in (configs[0] if configs else {}) if k not in NOT_ARM_KEYS
                  and len({repr(c.get(k)) for c in configs}) > 1)
    files = iter(path_labels([ld.path for ld in loaded if ld.cfg is None]))
    out = []
    for ld in loaded:
        if ld.cfg is None:
            out.append(next(files))
        else:
            c = ld.cfg.to_dict()
            out.append(",".join(f"{k}={c.get(k)}" for k in keys) or f"norm={ld.cfg.norm}")
    return out


def path_labels(paths: list[Path]) -> list[str]:
    """Each file's name without its extension, with as many of its parent folders as it takes
    to tell it from every other file given (bn/model.pt and nobn/model.pt: 'bn/model',
    'nobn/model'): equal labels make one arm, so two files must never share one by accident.
    The same file given twice keeps one label."""
    def suffix(p: Path, k: int) -> str:
        return "/".join((*p.parts[:-1], p.stem)[-k:])

    out = []
    for p in paths:
        others = [q for q in paths if q.resolve() != p.resolve()]
        for k in range(1, len(p.parts) + 1):
            label = suffix(p, k)
            if all(suffix(q, k) != label for q in others):
                break
        else:  # the paths differ only in the extension or above the shorter one's root
            label = str(p)
        out.append(label)
    return out


def _check_same_test_set(loaded: list[Loaded]) -> list[tuple]:
    fps = [test_fingerprint(ld) for ld in loaded]
    ref = fps[0]
    for ld, fp in zip(loaded[1:], fps[1:]):
        if fp[0] != ref[0]:
            raise UserError(f"{str(ld.path)!r} has {len(fp[0])} classes "
                            f"{list(fp[0])[:3]}..., the first model {len(ref[0])} "
                            f"{list(ref[0])[:3]}...; compare needs the same classes")
        if fp[1:] != ref[1:]:
            raise UserError(f"{str(ld.path)!r} was tested on another test set "
                            f"({fp[1]} images vs {ref[1]} of the first model, or other "
                            "images); compare needs the same test set")
    return fps


def _seed_key(ld: Loaded) -> tuple:
    seed = ld.cfg.seed if ld.cfg is not None else None
    return (0, seed) if isinstance(seed, int) else (1, 0)


def _run_id(ld: Loaded) -> str:
    run = ld.run_dir
    return run.run_id if run is not None else str(ld.path)


def compare_models(loaded: list[Loaded], out_dir: Path, labels: list[str] | None = None,
                   corruptions: bool = True, log=print) -> dict:
    """Compare the predictions of `loaded` and write compare.json and figures to `out_dir`.

    All models must share the test set (same classes, same images in the same order);
    otherwise a UserError names the first that differs. Returns the compare.json content.
    """
    if not loaded:
        raise UserError("compare needs at least one run or model")
    if labels is not None and len(labels) != len(loaded):
        raise UserError(f"got {len(labels)} labels for {len(loaded)} models; give one per model")
    fps = _check_same_test_set(loaded)
    labels = [str(s) for s in labels] if labels else default_labels(loaded)
    arm_order = list(dict.fromkeys(labels))
    order = sorted(range(len(loaded)), key=lambda i: (arm_order.index(labels[i]),
                                                       _seed_key(loaded[i]), i))
    k = loaded[0].bundle.num_classes

    runs, logits = [], []
    for i in order:
        ld, label = loaded[i], labels[i]
        log(f"predictions: {label} ({_run_id(ld)})")
        p = run_predictions(ld, corruptions, fps[i], log=log)
        lg, y = p["logits"], p["labels"]
        logits.append(lg)
        runs.append({"run_id": _run_id(ld), "arm": label,
                     "seed": ld.cfg.seed if ld.cfg is not None else None,
                     "test_acc": M.accuracy(lg, y), "nll": M.nll(lg, y), "brier": M.brier(lg, y),
                     "ece": M.ece(lg, y), "per_class_acc": M.per_class_accuracy(lg, y, k),
                     "reliability": M.reliability(lg, y),
                     "confidence_hist": M.confidence_histogram(lg), "n_test": len(y),
                     "batch_stat_layers": p["batch_stat_layers"],
                     "corruption_acc": p["corruption_acc"], "adabn_acc": p["adabn_acc"],
                     "adabn_clean_acc": p["adabn_clean_acc"]})
    pairs = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            a, b = runs[i], runs[j]
            pairs.append({"a": a["run_id"], "b": b["run_id"], "arm_a": a["arm"],
                          "arm_b": b["arm"], **M.flips(logits[i], logits[j], y),
                          "kl_ab": M.kl(logits[i], logits[j]),
                          "kl_ba": M.kl(logits[j], logits[i]), "js": M.js(logits[i], logits[j])})
    result = summarize_comparison({"format": FORMAT, "classes": list(loaded[0].bundle.classes),
                        "n_test": len(y), "ece_bins": M.ECE_BINS, "runs": runs, "pairs": pairs,
                        "figures": []})
    out_dir = Path(out_dir)
    result["figures"] = write_figures(result, out_dir)
    atomic_write_json(out_dir / "compare.json", result)
    return result


def compare_runs(run_dirs: list[RunDir | Path], out_dir: Path, labels: list[str] | None = None,
                 data_dir: str | None = None, device: str = "cpu", corruptions: bool = True,
                 log=print) -> dict:
    """compare_models of bnlab runs, each loaded from its run folder's checkpoint."""
    run_dirs = [r if isinstance(r, RunDir) else RunDir(Path(r)) for r in run_dirs]
    if not run_dirs:
        raise UserError("compare needs at least one run folder")
    loaded = [load_model(r.path, data_dir, device) for r in run_dirs]
    return compare_models(loaded, out_dir, labels, corruptions, log)


__all__ = ["compare_models", "compare_runs", "default_labels", "format_compare"]
