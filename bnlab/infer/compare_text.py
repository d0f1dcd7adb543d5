"""The tables `bnlab compare` prints, from a compare.json (bnlab.infer.seeds layout)."""

from __future__ import annotations

from bnlab.console import format_table
from bnlab.numbers import mean_sd


def _ms(s: dict | None, scale: float = 1.0, digits: int = 4) -> str:
    return mean_sd(s, scale, digits, missing="-")  # plain ASCII in the terminal's tables


def arms_table(result: dict) -> str:
    head = ["arm", "n", "test_acc", "nll", "brier", "ece"]
    rows = [[a["label"], str(a["n"]), *(_ms(a[k]) for k in ("test_acc", "nll", "brier", "ece"))]
            for a in result["arms"]]
    return "per arm, mean ± sd over its runs (seeds)\n" + format_table(head, rows)


def agreement_table(result: dict) -> str:
    head = ["", "arm a", "arm b", "pairs", "agree %", "one right %", "a right,b wrong %",
            "a wrong,b right %", "KL(a|b)", "KL(b|a)", "JS"]
    rows = []
    for r in result["agreement"]:
        rows.append([r["kind"], r["arm_a"], r["arm_b"], str(r["pairs"]),
                     *(_ms(r[k], 100, 2) for k in ("agreement", "flips", "right_to_wrong",
                                                   "wrong_to_right")),
                     *(_ms(r[k]) for k in ("kl_ab", "kl_ba", "js"))])
    return ("agreement between arms (every pair of runs, run of a vs run of b) and within an "
            "arm (every pair of its seeds), mean ± sd over pairs\n" + format_table(head, rows))


def corruption_tables(result: dict) -> list[str]:
    arms = result["arms"]
    if not all(a.get("corruption_acc") for a in arms):
        return []
    names = list(arms[0]["corruption_acc"]["by_corruption"])
    head = ["arm", "statistics", "clean", *names, "mean"]
    rows = []
    for a in arms:
        c = a["corruption_acc"]
        rows.append([a["label"], "training", _ms(a["test_acc"]),
                     *(_ms(c["by_corruption"][n]) for n in names), _ms(c["mean"])])
        if a.get("adabn_acc"):
            d = a["adabn_acc"]
            rows.append([a["label"], "AdaBN", _ms(a["adabn_clean_acc"]),
                         *(_ms(d["by_corruption"][n]) for n in names), _ms(d["mean"])])
        else:
            rows.append([a["label"], "AdaBN", "no batch statistics to adapt", *[""] * len(names),
                         ""])
    parts = ["accuracy under corruptions (mean over severities 1-5), mean ± sd over runs; "
             "AdaBN: norm statistics re-estimated on the corrupted test images\n"
             + format_table(head, rows)]
    head = ["arm", "statistics", "corruption", *[f"s{s}" for s in range(1, 6)]]
    rows = []
    for a in arms:
        for key, tag in (("corruption_acc", "training"), ("adabn_acc", "AdaBN")):
            if a.get(key):
                for n, spreads in a[key]["by_severity"].items():
                    rows.append([a["label"], tag, n, *(_ms(s, digits=3) for s in spreads)])
    parts.append("by severity\n" + format_table(head, rows))
    return parts


def format_compare(result: dict) -> str:
    """The compare tables as text."""
    parts = [arms_table(result)]
    if result["pairs"]:
        parts.append(agreement_table(result))
    parts += corruption_tables(result)
    head = ["run", "arm", "seed", "test_acc", "ece"]
    rows = [[r["run_id"], r["arm"], str(r.get("seed")), f"{r['test_acc']:.4f}",
             f"{r['ece']:.4f}"] for r in result["runs"]]
    parts.append("runs\n" + format_table(head, rows))
    k = len(result["classes"])
    if k <= 20:
        head = ["arm", *[c[:8] for c in result["classes"]]]
        rows = []
        for a in result["arms"]:
            runs = [r for r in result["runs"] if r["arm"] == a["label"]]
            cells = []
            for c in range(k):
                vals = [r["per_class_acc"][c] for r in runs if r["per_class_acc"][c] is not None]
                cells.append(f"{sum(vals) / len(vals):.3f}" if vals else "-")
            rows.append([a["label"], *cells])
        parts.append("per-class accuracy (mean over runs)\n" + format_table(head, rows))
    return "\n\n".join(parts)


__all__ = ["format_compare"]
