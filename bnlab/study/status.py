"""What a study's folder says: counts by status, one line per run, and the built-in studies.

Statuses come from the runs' own summaries; on top of bnlab.store's, a run never started is
`pending`, and one left `running` by a process that no longer holds its lock is `interrupted`.
"""

from __future__ import annotations

from pathlib import Path

from bnlab.console import format_table
from bnlab.errors import UserError
from bnlab.store import Store, open_store
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


def status_text(out: str | Path) -> str:
    """`bnlab study status`: counts by status, then one line per run with its axis values."""
    store = open_store(out, readonly=None)  # results on read-only storage can be listed
    meta = study_meta(store)
    rows = status_rows(store, [r["run_id"] for r in meta["runs"]])
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    head = (f"study {meta['name']} in {out}: {len(rows)} runs: "
            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    axes = [a for a in meta["axes"] if a != "dataset"] + ["dataset"]
    values = {r["run_id"]: r["values"] for r in meta["runs"]}
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


def list_text() -> str:
    """`bnlab study list`: every built-in study with its size and estimated time."""
    def minutes(m: float | None) -> str:
        if m is None:
            return "-"
        return f"{m:.0f} min" if m < 120 else f"{m / 60:.1f} h"

    rows = []
    for name in builtin_names():
        sp = load_spec(name)
        rows.append([name, str(len(expand(sp).runs)), minutes(sp.estimate.get("cpu_minutes")),
                     minutes(sp.estimate.get("gpu_minutes")), sp.description])
    return format_table(["study", "runs", "CPU time", "GPU time", "description"], rows)
