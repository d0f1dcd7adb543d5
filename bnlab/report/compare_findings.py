"""Findings from a stored prediction comparison, each citing the rows of compare_tables.

Every between-arm number is stated beside the within-arm (seed-to-seed) numbers of its two
arms; a number that rests on one run per arm says so (n = 1).
"""

from __future__ import annotations

from bnlab.infer.seeds import upgrade
from bnlab.report.document import Table
from bnlab.report.fmt import mean_std as ms


def _cite(table: Table | None, *rows: int) -> str:
    if table is None:
        return ""
    if len(rows) == 1:
        return f"({table.label}, row {rows[0]})"
    listed = ", ".join(str(r) for r in rows[:-1]) + f" and {rows[-1]}"
    return f"({table.label}, rows {listed})"


def _over(s: dict | None, what: str = "runs") -> str:
    n = (s or {}).get("n") or 0
    return f"mean ± sd over {n} {what}" if n > 1 else "one run, n = 1: no spread over seeds"


def _number(s: dict | None) -> float | None:
    v = (s or {}).get("mean")
    return v if isinstance(v, int | float) else None


def _table(tables: list[Table], suffix: str) -> Table | None:
    return next((t for t in tables if t.anchor.endswith(suffix)), None)


def _ece(compare: dict, tables: list[Table], on: str) -> list[str]:
    arms = [(i, a) for i, a in enumerate(compare.get("arms") or [], 1)
            if _number(a.get("ece")) is not None]
    if len(arms) < 2:
        return []
    i, a = min(arms, key=lambda ia: ia[1]["ece"]["mean"])
    lead = f"{on}among" if on else "Among"
    return [f"{lead} the compared arms, {a['label']} has the lowest expected calibration error "
            f"({ms(a['ece'], 1.0, 4)}; {_over(a['ece'])}) {_cite(tables[0], i)}."]


def _baseline(label: str, row: dict | None) -> tuple[str, dict | None]:
    if row is None or not row.get("pairs"):
        return f"{label} has one run", None
    k = row["pairs"]
    known = row["agreement"] if _number(row.get("agreement")) is not None else None
    return (f"two runs of {label} agree on {ms(row['agreement'])}% "
            f"({k} pair{'s' if k != 1 else ''})", known)


def _points(x: float) -> str:
    return f"{100 * x:.2f}"


def _against_seeds(agree: float, within: list[tuple[str, dict]]) -> str:
    """The mean between-arm agreement against the mean within-arm agreement of each arm that
    has one. Only a gap larger than that arm's sd over its pairs of seeds is called "less than
    seeds agree": a smaller one lies inside the seed-to-seed variation."""
    parts, firm, loose, unmeasured = [], [], [], []
    for label, w in within:
        gap, sd = w["mean"] - agree, w.get("sd")
        side = "below" if gap > 0 else "above" if gap < 0 else "equal to"
        spread = (f"sd over its pairs {_points(sd)}" if isinstance(sd, int | float)
                  else "one pair: no sd")
        amount = f"{_points(abs(gap))} points {side}" if gap else side
        parts.append(f"{amount} the mean within {label} ({spread})")
        if gap > 0 and not isinstance(sd, int | float):
            unmeasured.append(label)
        elif gap > 0 and gap > sd:
            firm.append(label)
        elif gap > 0:
            loose.append(label)
    text = "; the mean agreement between the arms is " + ", and ".join(parts)
    no_sd = (f"{' and '.join(unmeasured)} {'has' if len(unmeasured) == 1 else 'have'} one "
             "pair of seeds (no seed-to-seed sd to read the gap against)")
    if firm and not loose and not unmeasured:
        return text + (": the arms agree less than seeds of "
                       + ("either arm do" if len(firm) == 2 else "that arm do"))
    if firm:
        return text + (f": the arms agree less than seeds of {firm[0]} do; "
                       + (f"below {loose[0]} the gap is within its seed-to-seed variation"
                          if loose else no_sd))
    if loose:
        return text + (": no gap exceeds the seed-to-seed sd"
                       + (f"; {no_sd}" if unmeasured else "")
                       + ", so this does not show that the arms agree less than seeds do")
    if unmeasured:
        return text + f": {no_sd}, so this does not show that the arms agree less than seeds do"
    return text + ": the arms agree no less than seeds of one arm do"


def _agreement(compare: dict, tables: list[Table], on: str) -> list[str]:
    table = _table(tables, "-pairs")
    rows = compare.get("agreement") or []
    if table is None or not rows:
        return []
    within = {r["arm_a"]: (i, r) for i, r in enumerate(rows, 1) if r.get("kind") == "within"}
    out = []
    for i, r in enumerate(rows, 1):
        if r.get("kind") != "between" or _number(r.get("agreement")) is None:
            continue
        a, b = r["arm_a"], r["arm_b"]
        agree = _number(r["agreement"])
        text = (f"{on}{a} and {b} predict the same class on {ms(r['agreement'])}% of the test "
                f"images")
        if r.get("pairs", 0) > 1:
            text += f" ({_over(r['agreement'], 'pairs of runs')})"
        flips = r.get("right_to_wrong"), r.get("wrong_to_right")
        if all(_number(f) is not None for f in flips):
            text += (f"; {ms(flips[0])}% are right for {a} and wrong for {b}, "
                     f"{ms(flips[1])}% the reverse")
        ia, wa = within.get(a, (None, None))
        ib, wb = within.get(b, (None, None))
        base = [_baseline(a, wa), _baseline(b, wb)]
        cited = [i] + [j for j, w in ((ia, wa), (ib, wb)) if w is not None and w.get("pairs")]
        known = [(label, w) for label, (_, w) in zip((a, b), base) if w is not None]
        if not known:
            text += (". Each arm has one run (n = 1), so there is no seed-to-seed agreement "
                     "to read this against")
        else:
            text += ". Within an arm, " + ", and ".join(t for t, _ in base)
            text += _against_seeds(agree, known)
        out.append(f"{text} {_cite(table, *cited)}.")
    return out


def _adabn(compare: dict, tables: list[Table], on: str) -> list[str]:
    table = _table(tables, "-corruptions")
    if table is None:
        return []
    out, row = [], 0
    fixed = []
    for a in compare.get("arms") or []:
        c, d = a.get("corruption_acc") or {}, a.get("adabn_acc")
        row += 1
        train_row = row
        if d or a.get("adapts") is False:
            row += 1
        if d and _number(c.get("mean")) is not None and _number(d.get("mean")) is not None:
            word = "raises" if d["mean"]["mean"] > c["mean"]["mean"] else "lowers"
            lead = f"{on}re-estimating" if on else "Re-estimating"
            out.append(f"{lead} the norm statistics of {a['label']} on the "
                       f"corrupted test images (AdaBN) {word} its mean accuracy under "
                       f"corruptions from {ms(c['mean'])}% to {ms(d['mean'])}% "
                       f"({_over(d['mean'])}) {_cite(table, train_row, row)}.")
        elif a.get("adapts") is False and _number(c.get("mean")) is not None:
            fixed.append((a, c, train_row))
    for a, c, r in fixed:
        out.append(f"{on}{a['label']} has no batch statistics, so there is nothing for AdaBN "
                   f"to adapt: its mean accuracy under corruptions stays {ms(c['mean'])}% "
                   f"({_over(c['mean'])}) {_cite(table, r)}.")
    return out


def compare_sentences(compare: dict | None, tables: list[Table],
                      dataset: str | None = None) -> list[str]:
    """The findings of one stored comparison whose tables are `tables`."""
    if not compare or not tables:
        return []
    compare = upgrade(compare)
    on = f"On {dataset}, " if dataset else ""
    return _ece(compare, tables, on) + _agreement(compare, tables, on) + \
        _adabn(compare, tables, on)


__all__ = ["compare_sentences"]
