"""What a study's folder says: counts by status, one line per run, and the built-in studies.

Statuses come from the runs' own summaries; on top of bnlab.store's, a run never started is
`pending`, and one left `running` by a process that no longer holds its lock is `interrupted`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from bnlab import machine
from bnlab.console import format_table
from bnlab.errors import UserError
from bnlab.store import FINISHED, RunDir, Store, open_store
from bnlab.study.estimate import (
    CALIBRATED,
    MEASURED_ON,
    OWN_SOURCE,
    SPEED_FAMILIES,
    estimate,
    family,
    own_rates,
)
from bnlab.study.jobs import auto_jobs
from bnlab.study.spec import (
    DEFAULT_ROOT,
    Plan,
    builtin_names,
    expand,
    load_spec,
    plan_of_study_json,
)
from bnlab.study.tuning import with_known_choices


def count_statuses(store: Store, plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in status_rows(store, [r.run_id for r in plan.all_runs]):
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


def _summaries(plan: Plan, out: str | Path | None) -> dict[str, dict | None]:
    """The stored summary of every run of `plan` in the folder `out`, read from the run folders
    without writing anything (a folder that cannot be read counts as not begun); {} for a
    folder that does not exist (a new study: no run id to look up)."""
    if out is None or not Path(out).is_dir():
        return {}

    def summary(run_id: str) -> dict | None:
        try:
            return RunDir(Path(out) / run_id).summary
        except UserError:
            return None

    return {r.run_id: summary(r.run_id) for r in plan.all_runs}


def remaining(plan: Plan, out: str | Path | None,
              summaries: dict[str, dict | None] | None = None) -> tuple[list, dict[tuple, float]]:
    """The runs of `plan` still to train (every run but those with a result in the folder
    `out`), each config with the spec's dataset name (whose size the estimate knows), and the
    rates the folder's finished runs measured (estimate.own_rates)."""
    sizes = plan.spec.estimate.get("sizes")
    summaries = _summaries(plan, out) if summaries is None else summaries
    named = [(dataclasses.replace(r.cfg, dataset=r.dataset), r.run_id) for r in plan.all_runs]
    todo = [c for c, rid in named if (summaries.get(rid) or {}).get("status") not in FINISHED]
    return todo, own_rates(((c, summaries.get(rid)) for c, rid in named), sizes)


def study_estimate(plan: Plan, device: str, out: str | Path | None = None,
                   speed: Callable[[str, int, int], float | None] | None = None) -> str:
    """The spec's own minutes for `device` if it gives them (for a study not begun), else the
    estimate of the runs left: from the output folder's own measured throughput where it has
    finished runs like them, else from bnlab's table of measured rates. On the CPU the runs
    train as `--jobs auto` would train them on this machine (jobs.auto_jobs), and the table's
    rates are scaled by `speed(precision, batch, threads)`, this machine's measured factor for
    that setting, where it gives one. Runs that ask for precision "auto" are estimated at the
    folder's choice, else at the one this machine's cached measurements give
    (calibrate.cached_precision; fp32 without them, the slower of the two it chooses from), on
    a GPU at bf16."""
    spec = plan.spec
    sizes = spec.estimate.get("sizes")
    given = spec.estimate.get(f"{device}_minutes")
    if plan.asks_auto_precision:
        plan = plan.with_precision(_estimated_precision(plan, device, out))
    plan = with_known_choices(plan, out)
    summaries = _summaries(plan, out)
    todo, own = remaining(plan, out, summaries)
    if given is not None and len(todo) == len(plan.all_runs):
        return fmt_minutes(given) + " (spec)"
    if not todo:
        return "done"
    workers, factor = 1, None
    if device == "cpu":
        workers, threads = _cpu_workers(plan, summaries, "auto", on_cpu=lambda _: True)
        scalable = [c for c in todo if family(c.model)[0] in SPEED_FAMILIES]
        if scalable and speed is not None:
            factor = speed(scalable[0].precision, scalable[0].batch_size, threads)
    est = estimate(todo, device, sizes, own, speed=factor, workers=workers)
    mark = " (scaled)" if est.scaled else (" (own)" if OWN_SOURCE in est.sources else
                                           " (this CPU)" if CALIBRATED in est.sources else "")
    return fmt_minutes(est.minutes) + mark


def _estimated_precision(plan: Plan, device: str, out: str | Path | None) -> str:
    if (fixed := folder_precision(plan, out)) is not None:
        return fixed[0]
    if device != "cpu":
        return "bf16"
    from bnlab.study.calibrate import cached_precision  # torch-free

    first = next(r.cfg for r in plan.all_runs if r.cfg.precision == "auto")
    threads = _cpu_workers(plan, {}, "auto", on_cpu=lambda _: True)[1]
    return cached_precision(first.batch_size, threads) or "fp32"


def list_text() -> str:
    """`bnlab study list`: every built-in study with its size and estimated time on each device
    class bnlab was measured on."""
    from bnlab.study.calibrate import cached_speed  # torch-free

    rows, used = [], set()

    def speed(precision: str, batch: int, threads: int) -> float | None:
        factor = cached_speed(precision, batch, threads)
        if factor is not None:
            used.add(factor)
        return factor

    for name in builtin_names():
        plan = expand(load_spec(name))
        folder = DEFAULT_ROOT / name  # a study begun here: what is left, at its own rates
        folder = folder if (folder / "study.json").is_file() else None
        if folder is not None:  # its runs as that folder planned them (--data-map, --set, ...)
            meta = _study_json(folder)
            try:
                plan = plan_of_study_json(meta) if meta.get("name") == name else plan
            except (UserError, KeyError, TypeError):
                pass
        rows.append([name, str(len(plan.all_runs)), study_estimate(plan, "cpu", folder, speed),
                     study_estimate(plan, "gpu", folder), plan.spec.description])
    notes = [f"Estimated from measured throughput (bnlab/study/estimate.py): CPU = "
             f"{MEASURED_ON['cpu']}, GPU = {MEASURED_ON['gpu']} with GPU runs packed as the "
             "runner packs them; (own): a study begun in studies-out/NAME, its runs left at "
             "the rates its finished runs measured; (scaled): from the measurement of a smaller "
             "model of the family by its layers; unmeasured: no measurement of that model on "
             "that device; the CPU column trains runs as `study run --jobs auto` would here"
             + (f"; (this CPU): the CPU table's CIFAR ResNets and VGGs scaled by the "
                f"ResNet-20 speed `bnlab study run` measured on this machine at the study's "
                f"precision and threads ({', '.join(f'{f:.2f}' for f in sorted(used))} x)."
                if used else ".")]
    return format_table(["study", "runs", "CPU time", "GPU time", "description"], rows) + \
        "\n\n" + "\n".join(notes)


# -- before a study starts ---------------------------------------------------------------------
LARGE_STUDY = 1000  # runs to train above which `study run` asks for --yes (or max_runs)


CALIBRATE_ABOVE = 1.0  # minutes by the table: a shorter study is not worth 2 s of measuring


def _cpu_workers(plan: Plan, summaries: dict, jobs: int | str,
                 on_cpu: Callable[[str], bool] | None = None) -> tuple[int, int]:
    """(runs at once, torch threads a run) on this CPU as `study run --jobs` will train the
    plan's runs not finished by `summaries` (on_cpu: as jobs.auto_jobs; without torch, say
    every run is a CPU run)."""
    threads = None
    if jobs == "auto":
        left = [r for r in plan.all_runs
                if (summaries.get(r.run_id) or {}).get("status") not in FINISHED]
        workers, threads, _ = auto_jobs(plan.all_runs, left, plan.spec.estimate.get("sizes"),
                                        on_cpu)
    else:
        workers = jobs
    return workers, threads or max(1, machine.usable_cores() // workers)


def resolve_auto_precision(plan: Plan, out: str | Path, jobs: int | str = 1,
                           log=None) -> Plan:
    """The plan with precision "auto" chosen (bnlab.config): the folder's own choice where its
    study.json has one, so that a study resumed, here or on another machine, never mixes
    precisions; else bnlab.study.calibrate.choose_precision on the device of the first run
    that asks for it, at its batch and at the threads a run gets with `jobs`. A folder with no
    recorded choice whose runs trained in one precision (a study begun before its spec said
    "auto", or with --set precision=...) goes on in that one (folder_precision)."""
    if (fixed := folder_precision(plan, out)) is not None:
        chosen, why = fixed
    else:
        from bnlab.runtime import resolve_device  # lazy: torch
        from bnlab.study import calibrate

        first = next(r.cfg for r in plan.all_runs if r.cfg.precision == "auto")
        device = resolve_device(first.device).type
        threads = _cpu_workers(plan, _summaries(plan, out), jobs)[1] if device == "cpu" else 1
        chosen, why = calibrate.choose_precision(device, first.batch_size, threads, log)
    if log:
        log(f"precision auto: {chosen} ({why})")
    return plan.with_precision(chosen)


def folder_precision(plan: Plan, out: str | Path | None) -> tuple[str, str] | None:
    """(precision, why) that the folder `out` fixes for the runs of `plan` asking for "auto":
    the choice its study.json records, else the one precision its begun runs trained in; None
    where it fixes none (no folder, no runs, or runs in both)."""
    if out is None or not Path(out).is_dir():
        return None
    old = _study_json(out)
    if old.get("name") == plan.spec.name and old.get("precision_auto") in ("fp32", "bf16"):
        return old["precision_auto"], f"the choice recorded in {Path(out) / 'study.json'}"
    begun = {p: n for p in ("fp32", "bf16")
             if (n := sum(s is not None for s in _summaries(plan.with_precision(p), out)
                          .values()))}
    if len(begun) == 1:
        (chosen, n), = begun.items()
        return chosen, f"the precision of the {n} run{'s' if n > 1 else ''} begun in {out}"
    return None


def _study_json(out: str | Path) -> dict:
    try:
        doc = json.loads((Path(out) / "study.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def plan_estimate(plan: Plan, out: str | Path, jobs: int | str = 1,
                  log=None) -> tuple[str, int]:
    """(the line `study run` prints before it starts: how many runs are left to train and how
    long they take by bnlab.study.estimate, at the folder's own measured rates where it has
    finished runs like them, else at the table's rates, those of estimate.SPEED_FAMILIES scaled
    to this CPU by a measured ResNet-20 step (bnlab.study.calibrate; when such runs take
    CALIBRATE_ABOVE minutes or more by the table), with `jobs` runs at once as the runner will
    train them; the number of runs left)."""
    plan = with_known_choices(plan, out)  # a study resumed after its tuning: the chosen runs
    summaries = _summaries(plan, out)
    todo, own = remaining(plan, out, summaries)
    total = len(plan.all_runs)
    tuning = f" ({len(plan.tune_runs)} of them tuning runs)" if plan.tune_runs else ""
    line = f"study {plan.spec.name}: {len(todo)} of {total} runs{tuning} to train"
    if not todo:
        return line, 0
    from bnlab.runtime import resolve_device  # lazy: torch, only for a study about to run

    device = "gpu" if resolve_device(todo[0].device).type == "cuda" else "cpu"
    sizes = plan.spec.estimate.get("sizes")
    workers, speed = 1, None
    if device == "cpu":
        from bnlab.study import calibrate

        workers, threads = _cpu_workers(plan, summaries, jobs)
        # measured only for the runs the factor scales, at their precision and batch
        scalable = [c for c in todo if family(c.model)[0] in SPEED_FAMILIES]
        table = estimate(scalable, device, sizes, own)
        if table.sources != (OWN_SOURCE,) and (table.minutes or 0) >= CALIBRATE_ABOVE:
            speed = calibrate.speed(scalable[0].precision, scalable[0].batch_size, threads,
                                    log)
    est = estimate(todo, device, sizes, own, speed=speed, workers=workers)
    if est.minutes is None:
        return f"{line}; their time is unmeasured ({est.missing})", len(todo)
    where = ("this folder's own finished runs" if est.sources == (OWN_SOURCE,) else
             "this folder's own finished runs and bnlab's table of measured rates"
             if OWN_SOURCE in est.sources else "bnlab's table of measured rates")
    if CALIBRATED in est.sources:
        where += f", scaled to this CPU: {speed:.2f} x"
    at_once = f", {workers} runs at once" if workers > 1 else ""
    on = "this CPU" if device == "cpu" else MEASURED_ON[device]
    scaled = ", scaled from a smaller model" if est.scaled else ""
    unscaled = (f"; {', '.join(est.unscaled)} not scaled: this CPU's factor is a ResNet-20 "
                "measurement" if est.unscaled else "")
    return (f"{line}, estimated {fmt_minutes(est.minutes)} of training and evaluation on "
            f"{on}{at_once} (from {where}{scaled}{unscaled})", len(todo))


def confirm_size(plan: Plan, todo: int, yes: bool) -> None:
    """Refuse to start more than the spec's `max_runs` (LARGE_STUDY by default) runs unless
    `yes`: a typo in an axis (10,000 values) must not start days of training unasked."""
    limit = plan.spec.raw.get("max_runs", LARGE_STUDY)
    if todo > limit and not yes:
        whose = "the spec's max_runs" if "max_runs" in plan.spec.raw else "the limit"
        raise UserError(f"study {plan.spec.name} would train {todo} runs, more than {whose} "
                        f"of {limit}: pass --yes to start them, set max_runs = {todo} (or "
                        "more) in the spec, or narrow the grid with --only AXIS=VALUE")
