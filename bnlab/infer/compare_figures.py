"""The figures of a comparison, one curve or panel per arm with its spread over seeds."""

from __future__ import annotations

import io
import re
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from bnlab.numbers import mean_sd
from bnlab.store import atomic_write_bytes

FIGURES = ("reliability.png", "confidence.png", "corruptions.png")


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _wrap(label: str, width: int = 28) -> str:
    """The label wrapped after its commas (one space after each, whether the label had one
    or not, so "a=1, b=2" keeps a single space)."""
    return "\n".join(textwrap.wrap(re.sub(r",\s*", ", ", label), width)) or label


def pooled_reliability(runs: list[dict]) -> dict:
    """The reliability bins of several runs pooled: counts added, accuracy and confidence
    averaged with the counts as weights (the diagram of all their predictions together)."""
    first = runs[0]["reliability"]
    bins = len(first["count"])
    count = [sum(r["reliability"]["count"][b] for r in runs) for b in range(bins)]
    out = {"edges": first["edges"], "count": count, "acc": [], "conf": []}
    for key in ("acc", "conf"):
        for b in range(bins):
            total = sum(r["reliability"]["count"][b] * (r["reliability"][key][b] or 0.0)
                        for r in runs)
            out[key].append(total / count[b] if count[b] else None)
    return out


def _runs_of(result: dict, arm: dict) -> list[dict]:
    ids = set(arm["runs"])
    return [r for r in result["runs"] if r["run_id"] in ids and r["arm"] == arm["label"]]


def write_figures(result: dict, out_dir: Path) -> list[str]:
    arms = result["arms"]
    written = []
    n = len(arms)
    fig = Figure(figsize=(3.2 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        r = pooled_reliability(_runs_of(result, arm))
        w = 1.0 / len(r["count"])
        centers = [(a + b) / 2 for a, b in zip(r["edges"][:-1], r["edges"][1:])]
        acc = [a if a is not None else 0.0 for a in r["acc"]]
        ax.bar(centers, acc, width=w, edgecolor="black", linewidth=0.5, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect calibration")
        ax.set(title=f"{_wrap(arm['label'])}\nECE {mean_sd(arm['ece'], digits=3)} (n = {arm['n']})",
               xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
    axes[0][0].set_ylabel("accuracy (all seeds pooled)")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    _save(fig, out_dir / "reliability.png")
    written.append("reliability.png")

    # the legend under the axes: inside, it sat on the curves it names
    fig = Figure(figsize=(4.5, 3.2 + 0.2 * len(arms)), layout="constrained")
    ax = fig.subplots()
    for arm in arms:
        runs = _runs_of(result, arm)
        counts = [sum(r["confidence_hist"]["count"][b] for r in runs)
                  for b in range(len(runs[0]["confidence_hist"]["count"]))]
        total = max(1, sum(counts))
        ax.stairs([c / total for c in counts], runs[0]["confidence_hist"]["edges"],
                  label=f"{arm['label']} (n = {arm['n']})")
    ax.set(xlabel="confidence (max softmax probability)",
           ylabel="fraction of test images (seeds pooled)", xlim=(0, 1))
    fig.legend(loc="outside lower center", fontsize=7, frameon=False)
    _save(fig, out_dir / "confidence.png")
    written.append("confidence.png")

    if all(a.get("corruption_acc") for a in arms):
        names = list(arms[0]["corruption_acc"]["by_severity"])
        fig = Figure(figsize=(3.0 * len(names), 3.2))
        axes = fig.subplots(1, len(names), squeeze=False, sharey=True)
        for ax, name in zip(axes[0], names):
            for i, arm in enumerate(arms):
                color = f"C{i % 10}"
                for key, style, tag in (("corruption_acc", "-", ""),
                                        ("adabn_acc", "--", " AdaBN")):
                    c = arm.get(key)
                    if not c:
                        continue
                    first = arm["test_acc"] if key == "corruption_acc" else arm["adabn_clean_acc"]
                    points = [first, *c["by_severity"][name]]
                    ys = [100.0 * p["mean"] for p in points]  # percent, as in the report
                    err = [100.0 * (p["sd"] or 0.0) for p in points]
                    ax.errorbar(range(len(ys)), ys, yerr=err, color=color, linestyle=style,
                                marker="o", markersize=3, capsize=2,
                                label=f"{arm['label']}{tag}")
            ax.set(title=name, xlabel="severity (0 = clean)")
        axes[0][0].set_ylabel("test accuracy (%, mean ± sd over seeds)")
        handles, labels = axes[0][0].get_legend_handles_labels()
        rows = (len(labels) - 1) // 3
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02 - 0.06 * rows))
        fig.tight_layout(rect=(0, 0.08 + 0.06 * rows, 1, 1))
        _save(fig, out_dir / "corruptions.png")
        written.append("corruptions.png")
    return written


__all__ = ["FIGURES", "pooled_reliability", "write_figures"]
