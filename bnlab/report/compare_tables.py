"""The report's tables of a stored prediction comparison (OUT/<folder>/compare.json).

Three tables, in this order: per arm (test accuracy, NLL, Brier, ECE as mean ± sd over its
runs), agreement (between-arm rows over every pair of runs of two arms, then the within-arm
rows over every pair of seeds of one arm, the baseline the between-arm rows are read against),
and accuracy under corruptions with the training statistics and after AdaBN. A compare.json of
the earlier one-run-per-model layout is read as arms of one run (bnlab.infer.seeds.upgrade).
"""

from __future__ import annotations

from bnlab.infer.seeds import upgrade
from bnlab.report import fmt
from bnlab.report.document import Table
from bnlab.report.fmt import mean_std as ms

WITHIN = "within arm (seeds)"
BETWEEN = "between arms"


def _corruption_names(arms: list[dict]) -> list[str]:
    names: dict[str, None] = {}
    for a in arms:
        for key in ("corruption_acc", "adabn_acc"):
            names.update(dict.fromkeys((a.get(key) or {}).get("by_corruption") or {}))
    return list(names)


def compare_tables(compare: dict | None, first_number: int, folder: str = "analysis",
                   dataset: str | None = None, anchor: str = "compare") -> list[Table]:
    """Tables of one stored comparison (OUT/<folder>/compare.json, on `dataset`)."""
    if not compare or not (compare.get("runs") or compare.get("models")):
        return []
    compare = upgrade(compare)
    arms = compare.get("arms") or []
    source = f"From {folder}/compare.json"
    on = f" ({dataset})" if dataset else ""
    n = first_number
    head = ["Arm", "Runs", "Test acc. (%)", "NLL", "Brier", "ECE"]
    rows = [[str(a.get("label", "")), str(a.get("n", "")), ms(a.get("test_acc")),
             ms(a.get("nll"), 1.0, 3), ms(a.get("brier"), 1.0, 4), ms(a.get("ece"), 1.0, 4)]
            for a in arms]
    tables = [Table(n, f"Predictions of the compared arms on the test set{on}", head, rows,
                    [f"{source}. Mean ± sd over the runs (seeds) of each arm; a single number is "
                     "one run (n = 1, no spread). NLL: mean negative log-likelihood (nats); "
                     "Brier: mean squared error of the probability vector; ECE: expected "
                     "calibration error."], numeric=[False] + [True] * 5,
                    anchor=f"{anchor}-models")]
    agreement = compare.get("agreement") or []
    if compare.get("pairs") and agreement:
        n += 1
        head = ["Comparison", "Arm A", "Arm B", "Pairs of runs", "Agreement (%)",
                "One right (%)", "A right → B wrong (%)", "A wrong → B right (%)", "KL(A‖B)",
                "KL(B‖A)", "JS"]
        rows = []
        for r in agreement:
            rows.append([BETWEEN if r.get("kind") == "between" else WITHIN,
                         str(r.get("arm_a", "")), str(r.get("arm_b", "")),
                         _pairs(r), ms(r.get("agreement")), ms(r.get("flips")),
                         ms(r.get("right_to_wrong")), ms(r.get("wrong_to_right")),
                         ms(r.get("kl_ab"), 1.0, 4), ms(r.get("kl_ba"), 1.0, 4),
                         ms(r.get("js"), 1.0, 4)])
        tables.append(Table(
            n, f"Agreement between arms against the agreement between seeds of one arm{on}",
            head, rows,
            ["Between arms: every run of A against every run of B (n_A × n_B pairs); within "
             "an arm: every pair of its runs, which differ only in the seed. Read a "
             "between-arm row against the within-arm rows of its two arms: only what exceeds "
             "seed-to-seed variation is a difference between the arms. Mean ± sd over "
             "pairs (pairs share runs, so the sd describes them, not an independent sample); "
             "0 pairs: the arm has one run, so there is no seed-to-seed baseline.",
             "Agreement: share of test images with the same predicted class. One right: "
             "exactly one of the two runs is right. A right → B wrong: A is right and B is "
             "not; A wrong → B right the reverse (within an arm the two directions are "
             "averaged). KL and JS: mean divergences of the predicted distributions (nats)."],
            numeric=[False, False, False] + [True] * 8, anchor=f"{anchor}-pairs"))
    names = _corruption_names(arms)
    if names:
        n += 1
        head = ["Arm", "Statistics", "Clean", *names, "Mean"]
        rows = []
        for a in arms:
            c = a.get("corruption_acc") or {}
            rows.append([str(a.get("label", "")), "training", ms(a.get("test_acc")),
                         *(ms((c.get("by_corruption") or {}).get(k)) for k in names),
                         ms(c.get("mean"))])
            d = a.get("adabn_acc")
            if d:
                rows.append([str(a.get("label", "")), "AdaBN", ms(a.get("adabn_clean_acc")),
                             *(ms((d.get("by_corruption") or {}).get(k)) for k in names),
                             ms(d.get("mean"))])
            elif a.get("adapts") is False:
                rows.append([str(a.get("label", "")), "AdaBN: nothing to adapt",
                             *[fmt.DASH] * (len(names) + 2)])
        tables.append(Table(
            n, f"Accuracy under corruptions with training statistics and after AdaBN (%){on}",
            head, rows,
            ["Mean test accuracy over the 5 severities of each corruption; Mean: over all "
             "corruptions and severities; mean ± sd over the runs of each arm. Training: the "
             "model as trained. AdaBN (Li et al. 2016; Schneider et al. 2020): the statistics "
             "of every norm layer that uses batch statistics re-estimated on the corrupted "
             "test images themselves (Clean: on the clean ones), the model otherwise "
             "unchanged. A model without batch statistics has nothing to adapt."],
            numeric=[False, False] + [True] * (len(names) + 2),
            anchor=f"{anchor}-corruptions"))
    return tables


def _pairs(r: dict) -> str:
    k = r.get("pairs")
    if r.get("kind") == "between":
        return f"{k} ({r.get('runs_a')} × {r.get('runs_b')})"
    return str(k)


__all__ = ["BETWEEN", "WITHIN", "compare_tables", "ms"]
