"""Prediction comparison of trained runs on their common test set.

`compare_runs(run_dirs, out_dir)` loads each run's checkpoint, predicts the clean and the
corrupted test sets, and writes OUT/compare.json plus figures (reliability.png,
confidence.png, corruptions.png) through the store. Every metric is defined in
bnlab.infer.metrics; the corruptions in bnlab.infer.corrupt.
"""

from __future__ import annotations

import hashlib
import io
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from bnlab.console import format_table
from bnlab.errors import UserError
from bnlab.infer import metrics as M
from bnlab.infer.corrupt import CORRUPTIONS, SEVERITIES, corrupt, noise_generator
from bnlab.infer.loading import (
    EVAL_BATCH,
    Loaded,
    checkpoint_path,
    from_unit,
    load_model,
    predict,
    test_loader,
    to_unit,
)
from bnlab.store import RunDir, atomic_write_bytes, atomic_write_json

FIGURES = ("reliability.png", "confidence.png", "corruptions.png")


def default_labels(configs: list[dict], run_ids: list[str]) -> list[str]:
    """'key=value,...' of the config keys that differ between the runs (run ids if none do)."""
    ignore = {"device", "data_dir", "download", "eval_batch_size", "workers", "probe_every",
              "tensorboard"}
    keys = sorted(k for k in configs[0] if k not in ignore
                  and len({repr(c.get(k)) for c in configs}) > 1)
    labels = [",".join(f"{k}={c.get(k)}" for k in keys) for c in configs] if keys else []
    if not labels or len(set(labels)) < len(labels):
        return list(run_ids)
    return labels


def _test_fingerprint(loaded: Loaded) -> tuple:
    """Class names, test size, and a hash of the test labels and images."""
    h = hashlib.sha256()
    n = 0
    for x, y in test_loader(loaded).epoch(0):
        h.update(y.cpu().numpy().tobytes())
        h.update(x.float().cpu().numpy().tobytes())
        n += len(y)
    return tuple(loaded.bundle.classes), n, h.hexdigest()


def corruption_accuracy(loaded: Loaded, batch_size: int = EVAL_BATCH
                        ) -> dict[str, list[float]]:
    """Accuracy at severities 1..5 of each corruption (same noise for every model)."""
    out = {}
    for name in CORRUPTIONS:
        accs = []
        for s in range(1, SEVERITIES + 1):
            g = noise_generator(name, s)

            def tf(x, name=name, s=s, g=g):
                return from_unit(corrupt(to_unit(x, loaded.bundle), name, s, g), loaded.bundle, x)

            logits, y = predict(loaded.model, test_loader(loaded, batch_size), tf)
            accs.append(M.accuracy(logits, y))
        out[name] = accs
    return out


def compare_runs(run_dirs: list[RunDir], out_dir: Path, labels: list[str] | None = None,
                 data_dir: str | None = None, device: str = "cpu", corruptions: bool = True,
                 log=print) -> dict:
    """Compare the predictions of `run_dirs` and write compare.json and figures to `out_dir`.

    All runs must share the test set (same classes, same images in the same order); otherwise
    a UserError names the first run that differs. Returns the compare.json content.
    """
    run_dirs = [r if isinstance(r, RunDir) else RunDir(Path(r)) for r in run_dirs]
    if not run_dirs:
        raise UserError("compare needs at least one run folder")
    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"got {len(labels)} labels for {len(run_dirs)} runs; give one per run")
    loaded = [load_model(r.path, data_dir, device) for r in run_dirs]
    ref = _test_fingerprint(loaded[0])
    for r, ld in zip(run_dirs[1:], loaded[1:]):
        fp = _test_fingerprint(ld)
        if fp[0] != ref[0]:
            raise UserError(f"{str(checkpoint_path(r.path))!r} has {len(fp[0])} classes "
                            f"{list(fp[0])[:3]}..., the first run {len(ref[0])} "
                            f"{list(ref[0])[:3]}...; compare needs the same classes")
        if fp[1:] != ref[1:]:
            raise UserError(f"{str(checkpoint_path(r.path))!r} was tested on another test set "
                            f"({fp[1]} images vs {ref[1]} of the first run, or other images); "
                            "compare needs the same test set")
    ids = [r.run_id for r in run_dirs]
    labels = list(labels) if labels else default_labels([ld.cfg.to_dict() for ld in loaded], ids)
    k = loaded[0].bundle.num_classes

    models, logits = [], []
    for rid, label, ld in zip(ids, labels, loaded):
        lg, y = predict(ld.model, test_loader(ld))
        logits.append(lg)
        entry = {"run_id": rid, "label": label, "test_acc": M.accuracy(lg, y),
                 "nll": M.nll(lg, y), "brier": M.brier(lg, y), "ece": M.ece(lg, y),
                 "per_class_acc": M.per_class_accuracy(lg, y, k),
                 "reliability": M.reliability(lg, y), "confidence_hist": M.confidence_histogram(lg),
                 "n_test": len(y)}
        if corruptions:
            log(f"corruptions: {label}")
            entry["corruption_acc"] = corruption_accuracy(ld)
        models.append(entry)
    pairs = []
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            pairs.append({"a": ids[i], "b": ids[j], "label_a": labels[i], "label_b": labels[j],
                          **M.flips(logits[i], logits[j], y), "kl_ab": M.kl(logits[i], logits[j]),
                          "kl_ba": M.kl(logits[j], logits[i]), "js": M.js(logits[i], logits[j])})
    result = {"models": models, "pairs": pairs, "classes": list(loaded[0].bundle.classes),
              "ece_bins": M.ECE_BINS, "figures": []}
    out_dir = Path(out_dir)
    result["figures"] = write_figures(result, out_dir)
    atomic_write_json(out_dir / "compare.json", result)
    return result


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _wrap(label: str, width: int = 28) -> str:
    return "\n".join(textwrap.wrap(label.replace(",", ", "), width)) or label


def write_figures(result: dict, out_dir: Path) -> list[str]:
    models = result["models"]
    written = []
    n = len(models)
    fig = Figure(figsize=(3.2 * n, 3.2))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, m in zip(axes[0], models):
        r = m["reliability"]
        w = 1.0 / len(r["count"])
        centers = [(a + b) / 2 for a, b in zip(r["edges"][:-1], r["edges"][1:])]
        acc = [a if a is not None else 0.0 for a in r["acc"]]
        ax.bar(centers, acc, width=w, edgecolor="black", linewidth=0.5, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
        ax.set(title=f"{_wrap(m['label'])}\nECE {m['ece']:.3f}", xlabel="confidence",
               xlim=(0, 1), ylim=(0, 1))
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    _save(fig, out_dir / "reliability.png")
    written.append("reliability.png")

    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    for m in models:
        h = m["confidence_hist"]
        total = max(1, sum(h["count"]))
        ax.stairs([c / total for c in h["count"]], h["edges"], label=m["label"])
    ax.set(xlabel="confidence (max softmax probability)", ylabel="fraction of test images",
           xlim=(0, 1))
    ax.legend(fontsize=7)
    _save(fig, out_dir / "confidence.png")
    written.append("confidence.png")

    if all("corruption_acc" in m for m in models):
        names = list(models[0]["corruption_acc"])
        fig = Figure(figsize=(3.0 * len(names), 3.0))
        axes = fig.subplots(1, len(names), squeeze=False, sharey=True)
        for ax, name in zip(axes[0], names):
            for m in models:
                ys = [m["test_acc"], *m["corruption_acc"][name]]
                ax.plot(range(len(ys)), ys, marker="o", markersize=3, label=m["label"])
            ax.set(title=name, xlabel="severity (0 = clean)")
        axes[0][0].set_ylabel("test accuracy")
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(len(models), 3), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02 - 0.06 * ((len(models) - 1) // 3)))
        fig.tight_layout(rect=(0, 0.08 + 0.06 * ((len(models) - 1) // 3), 1, 1))
        _save(fig, out_dir / "corruptions.png")
        written.append("corruptions.png")
    return written


def format_compare(result: dict) -> str:
    """The compare tables as text."""
    head = ["model", "test_acc", "nll", "brier", "ece"]
    corr = "corruption_acc" in result["models"][0]
    if corr:
        head += [f"{c}(mean 1-5)" for c in result["models"][0]["corruption_acc"]]
    rows = []
    for m in result["models"]:
        row = [m["label"], f"{m['test_acc']:.4f}", f"{m['nll']:.4f}", f"{m['brier']:.4f}",
               f"{m['ece']:.4f}"]
        if corr:
            row += [f"{sum(v) / len(v):.4f}" for v in m["corruption_acc"].values()]
        rows.append(row)
    parts = [format_table(head, rows)]
    if corr:
        head = ["model", "corruption", *[f"s{s}" for s in range(1, SEVERITIES + 1)]]
        rows = [[m["label"], name, *[f"{a:.4f}" for a in accs]]
                for m in result["models"] for name, accs in m["corruption_acc"].items()]
        parts.append(format_table(head, rows))
    if result["pairs"]:
        head = ["a", "b", "agree", "a right,b wrong", "a wrong,b right", "both right",
                "both wrong", "KL(a|b)", "KL(b|a)", "JS"]
        rows = [[p["label_a"], p["label_b"], f"{p['agreement']:.4f}", str(p["right_to_wrong"]),
                 str(p["wrong_to_right"]), str(p["both_right"]), str(p["both_wrong"]),
                 f"{p['kl_ab']:.4f}", f"{p['kl_ba']:.4f}", f"{p['js']:.4f}"]
                for p in result["pairs"]]
        parts.append(format_table(head, rows))
    k = len(result["classes"])
    if k <= 20:
        head = ["model", *[c[:8] for c in result["classes"]]]
        rows = [[m["label"], *["-" if a is None else f"{a:.3f}" for a in m["per_class_acc"]]]
                for m in result["models"]]
        parts.append("per-class accuracy\n" + format_table(head, rows))
    return "\n\n".join(parts)
