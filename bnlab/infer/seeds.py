"""Comparisons read against seed-to-seed variation: the summaries of compare.json.

Pure functions of the per-run and per-pair entries of a comparison (plain dicts, as stored in
compare.json), so a stored comparison can be summarized again without its models:

* `arm_summaries`: per arm, every per-run number as mean ± sd over the arm's runs (seeds);
* `agreement_rows`: per pair of arms, the between-arm numbers over all n_A x n_B pairs of runs
  (run i of arm A against run j of arm B), and per arm the within-arm (seed-to-seed) numbers
  over its n (n - 1) / 2 pairs of runs, the baseline the between-arm numbers are read against.

A spread is {"mean", "sd", "n"} (bnlab.numbers.spread): the sample standard deviation
(divisor n - 1; None for n < 2) of the n values. Pairs of runs share runs, so their spread
describes the pairs, not an independent sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bnlab.numbers import spread

FORMAT = 2  # compare.json layout; format 1 had one run per label ("models") and no summaries
PAIR_FIELDS = ("agreement", "flips", "right_to_wrong", "wrong_to_right", "kl_ab", "kl_ba", "js")


def _mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if isinstance(v, int | float)]
    return math.fsum(vals) / len(vals) if vals else None


def _corruption_summary(runs: list[dict], key: str) -> dict | None:
    """{"mean": spread over runs of each run's mean over corruptions and severities,
    "by_corruption": {name: spread of each run's mean over severities},
    "by_severity": {name: [spread at severity 1..5]}}; None when a run lacks `key`."""
    tables = [r.get(key) for r in runs]
    if not tables or any(not isinstance(t, dict) or not t for t in tables):
        return None
    names = list(tables[0])
    by_c = {c: spread([_mean(t.get(c) or []) for t in tables]) for c in names}
    severities = max(len(t.get(c) or []) for t in tables for c in names)
    by_s = {c: [spread([(t.get(c) or [None] * severities)[s] for t in tables])
                for s in range(severities)] for c in names}
    overall = spread([_mean([v for c in names for v in (t.get(c) or [])]) for t in tables])
    return {"mean": overall, "by_corruption": by_c, "by_severity": by_s}


def arm_summaries(runs: list[dict]) -> list[dict]:
    """One entry per arm (by the runs' "arm", in order of first appearance)."""
    arms: dict[str, list[dict]] = {}
    for r in runs:
        arms.setdefault(str(r["arm"]), []).append(r)
    out = []
    for label, rs in arms.items():
        # a model adapts when its norms use batch statistics, measured or not (--no-corruptions)
        adapts = all((r.get("batch_stat_layers") or 0) > 0 for r in rs)
        measured = adapts and all(r.get("adabn_acc") for r in rs)
        entry = {"label": label, "runs": [r["run_id"] for r in rs],
                 "seeds": [r.get("seed") for r in rs], "n": len(rs), "adapts": adapts,
                 **{k: spread([r.get(k) for r in rs])
                    for k in ("test_acc", "nll", "brier", "ece")},
                 "corruption_acc": _corruption_summary(rs, "corruption_acc"),
                 "adabn_acc": _corruption_summary(rs, "adabn_acc") if measured else None,
                 "adabn_clean_acc": spread([r.get("adabn_clean_acc") for r in rs])
                 if measured else None}
        out.append(entry)
    return out


def pair_fractions(pair: dict) -> dict:
    """A pair's counts as fractions of its test images: flips (exactly one of the two runs
    right), right_to_wrong (a right, b wrong) and wrong_to_right (the reverse)."""
    n = sum(pair.get(k) or 0 for k in ("both_right", "both_wrong", "right_to_wrong",
                                       "wrong_to_right"))
    if not n:
        return {"flips": None, "right_to_wrong": None, "wrong_to_right": None}
    r2w, w2r = pair.get("right_to_wrong") or 0, pair.get("wrong_to_right") or 0
    return {"flips": (r2w + w2r) / n, "right_to_wrong": r2w / n, "wrong_to_right": w2r / n}


def _symmetric(pair: dict) -> dict:
    """Within an arm the order of two runs is arbitrary: each directed number becomes the mean
    of its two directions."""
    f = pair_fractions(pair)
    half = f["flips"] / 2 if f["flips"] is not None else None
    kls = [pair.get("kl_ab"), pair.get("kl_ba")]
    kl = _mean(kls) if all(isinstance(k, int | float) for k in kls) else None
    return {"agreement": pair.get("agreement"), "flips": f["flips"], "right_to_wrong": half,
            "wrong_to_right": half, "kl_ab": kl, "kl_ba": kl, "js": pair.get("js")}


def agreement_rows(pairs: list[dict], arms: list[dict]) -> list[dict]:
    """Between-arm rows (for every two arms, in arm order), then one within-arm row per arm
    (with 0 pairs when the arm has one run: no seed-to-seed baseline)."""
    order = {a["label"]: i for i, a in enumerate(arms)}
    size = {a["label"]: a["n"] for a in arms}
    rows = []
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            here = [{**p, **pair_fractions(p)} for p in pairs
                    if (p.get("arm_a"), p.get("arm_b")) == (a["label"], b["label"])]
            here += [_flipped(p) for p in pairs
                     if (p.get("arm_a"), p.get("arm_b")) == (b["label"], a["label"])]
            rows.append({"kind": "between", "arm_a": a["label"], "arm_b": b["label"],
                         "runs_a": size[a["label"]], "runs_b": size[b["label"]],
                         "pairs": len(here),
                         **{k: spread([p.get(k) for p in here]) for k in PAIR_FIELDS}})
    for a in sorted(arms, key=lambda a: order[a["label"]]):
        here = [_symmetric(p) for p in pairs
                if p.get("arm_a") == a["label"] and p.get("arm_b") == a["label"]]
        rows.append({"kind": "within", "arm_a": a["label"], "arm_b": a["label"],
                     "runs_a": a["n"], "runs_b": a["n"], "pairs": len(here),
                     **{k: spread([p.get(k) for p in here]) for k in PAIR_FIELDS}})
    return rows


def _flipped(p: dict) -> dict:
    f = pair_fractions(p)
    return {"agreement": p.get("agreement"), "flips": f["flips"],
            "right_to_wrong": f["wrong_to_right"], "wrong_to_right": f["right_to_wrong"],
            "kl_ab": p.get("kl_ba"), "kl_ba": p.get("kl_ab"), "js": p.get("js")}


def summarize_comparison(result: dict) -> dict:
    """`result` with its "arms" and "agreement" summaries (re)computed from runs and pairs."""
    arms = arm_summaries(result["runs"])
    return {**result, "arms": arms, "agreement": agreement_rows(result["pairs"], arms)}


def upgrade(compare: dict) -> dict:
    """A compare.json in the current format: format 1 (one run per label under "models")
    becomes one arm per run, so it reads as comparisons with n = 1 per arm."""
    if compare.get("format") == FORMAT or "models" not in compare:
        return compare
    runs = [{**m, "arm": str(m.get("label", m.get("run_id"))), "seed": None}
            for m in compare.get("models") or [] if isinstance(m, dict)]
    arm_of = {r.get("run_id"): r["arm"] for r in runs}
    pairs = [{**p, "arm_a": arm_of.get(p.get("a")), "arm_b": arm_of.get(p.get("b"))}
             for p in compare.get("pairs") or [] if isinstance(p, dict)]
    rest = {k: v for k, v in compare.items() if k not in ("models", "pairs")}
    out = summarize_comparison({**rest, "format": FORMAT, "runs": runs, "pairs": pairs})
    for a in out["arms"]:
        a["adapts"] = None  # format 1 did not measure AdaBN: unknown, not "nothing to adapt"
    return out


__all__ = ["FORMAT", "PAIR_FIELDS", "agreement_rows", "arm_summaries", "pair_fractions",
           "summarize_comparison", "upgrade"]
