"""What a study's folder says: counts by status, one line per run, and the built-in studies.

Statuses come from the runs' own summaries; on top of bnlab.store's, a run never started is
`pending`, and one left `running` by a process that no longer holds its lock is `interrupted`.
"""

from __future__ import annotations

from pathlib import Path

from bnlab.console import format_table
from bnlab.errors import UserError
from bnlab.store import Store, open_store
from bnlab.study.estimate import MEASURED_ON, estimate
from bnlab.study.spec import DEFAULT_ROOT, Plan, builtin_names, expand, load_spec


def count_statuses(store: Store, plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in status_rows(store, [r.run_id for r in plan.runs]):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


# -- status ------------------------------------------------------------------------------------
def status_rows(store: Store, run_ids: list[str]) -> list[dict]:
    """One row per run: its stored summary, with `pending` for runs never started and
    `interrupted` for runs left `running` by a process that no longer holds their lock."""
    attempts = store.attempts()
    rows = []
    for run_id in run_ids:
        summary = store.run(run_id).summary
        status = "pending" if summary is None else summary.get("status", "running")
        if status == "running" and not store.is_locked(run_id):
            status = "interrupted"
        rows.append({"run_id": run_id, "status": status, **{
            k: (summary or {}).get(k) for k in ("epochs_done", "epochs", "test_acc",
                                                 "train_acc", "wall_time", "error")},
            "attempts": len(attempts.get(run_id, []))})
    return rows


def resolve_out(target: str, out: str | None = None) -> Path:
    """The output folder of a study given as its folder, a built-in name or a spec path."""
    p = Path(target)
    if p.is_dir():
        if not (p / "study.json").is_file():
            raise UserError(f"{target!r} is not a study output folder (no study.json)")
        return p
    folder = Path(out) if out else DEFAULT_ROOT / load_spec(target).name
    if not (folder / "study.json").is_file():
        raise UserError(f"no study results in {str(folder)!r} (run `bnlab study run {target}` "
                        "first, or pass the folder)")
    return folder


def study_meta(store: Store) -> dict:
    """OUT/study.json, with its list of runs checked (a damaged file is one line, not a
    KeyError)."""
    meta = store.read_meta("study.json")
    runs = meta.get("runs") if isinstance(meta, dict) else None
    if not isinstance(runs, list) or not all(
            isinstance(r, dict) and isinstance(r.get("run_id"), str) for r in runs):
        raise UserError(f"{str(store.root / 'study.json')!r} holds no list of runs (damaged?)")
    for r in runs:
        r["values"] = r.get("values") if isinstance(r.get("values"), dict) else {}
    meta.setdefault("name", store.root.name)
    meta["axes"] = [a for a in meta.get("axes") or [] if isinstance(a, str)]
    return meta


def status_records(out: str | Path) -> tuple[dict, list[str], list[dict]]:
    """study.json, its axes (dataset last) and one record per run: run_id, its axis values,
    status, epochs_done, epochs, test_acc, train_acc, wall_time, attempts, error."""
    store = open_store(out, readonly=None)  # results on read-only storage can be listed
    meta = study_meta(store)
    axes = [a for a in meta["axes"] if a != "dataset"] + ["dataset"]
    values = {r["run_id"]: r["values"] for r in meta["runs"]}
    records = []
    for r in status_rows(store, [r["run_id"] for r in meta["runs"]]):
        v = values[r["run_id"]]
        records.append({"run_id": r["run_id"], **{a: v.get(a) for a in axes},
                        **{k: x for k, x in r.items() if k != "run_id"}})
    return meta, axes, records


def status_text(out: str | Path) -> str:
    """`bnlab study status`: counts by status, then one line per run with its axis values."""
    meta, axes, rows = status_records(out)
    values = {r["run_id"]: r["values"] for r in meta["runs"]}
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    head = (f"study {meta['name']} in {out}: {len(rows)} runs: "
            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    table = []
    for r in rows:
        acc = r["test_acc"]
        table.append([r["run_id"], *(str(values[r["run_id"]].get(a)) for a in axes), r["status"],
                      f"{r['epochs_done'] or 0}/{r['epochs'] or '?'}",
                      f"{acc:.4f}" if isinstance(acc, float) else "-",
                      f"{r['wall_time']:.1f}" if r["wall_time"] is not None else "-",
                      str(r["attempts"])])
    return head + "\n" + format_table(
        ["run_id", *axes, "status", "epochs", "test_acc", "wall_s", "attempts"], table)


def fmt_minutes(m: float | None) -> str:
    if m is None:
        return "unmeasured"
    if m < 1:
        return f"{m * 60:.0f} s"
    if m >= 48 * 60:
        return f"{m / 1440:,.0f} d"
    return f"{m:.0f} min" if m < 120 else f"{m / 60:.1f} h"


def study_estimate(spec, device: str) -> str:
    """The spec's own minutes for `device` if it gives them, else the estimate from measured
    throughput."""
    given = spec.estimate.get(f"{device}_minutes")
    if given is not None:
        return fmt_minutes(given) + " (spec)"
    est = estimate([r.cfg for r in expand(spec).runs], device, spec.estimate.get("sizes"))
    return fmt_minutes(est.minutes) + (" (scaled)" if est.scaled else "")


def list_text() -> str:
    """`bnlab study list`: every built-in study with its size and estimated time on each device
    class bnlab was measured on."""
    rows = []
    for name in builtin_names():
        sp = load_spec(name)
        rows.append([name, str(len(expand(sp).runs)), study_estimate(sp, "cpu"),
                     study_estimate(sp, "gpu"), sp.description])
    notes = [f"Estimated from measured throughput (bnlab/study/estimate.py): CPU = "
             f"{MEASURED_ON['cpu']}, GPU = {MEASURED_ON['gpu']} with GPU runs packed as the "
             "runner packs them; (scaled): from the measurement of a smaller model of the "
             "family by its layers; unmeasured: no measurement of that model on that device."]
    return format_table(["study", "runs", "CPU time", "GPU time", "description"], rows) + \
        "\n\n" + "\n".join(notes)
