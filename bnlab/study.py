"""Running a study: every run of a plan (bnlab/spec.py), resumable, isolated, locked.

The unit of work is `run_one`: under the run's lock file it skips a finished run, resumes an
interrupted one from its checkpoint, or trains it from scratch, and turns any failure into a
stored `failed` summary instead of an exception. Because every file a run writes is replaced
atomically and the lock dies with its process, a runner killed at any moment (SIGKILL included)
and started again ends with exactly the results of an uninterrupted study, and two runners on
the same folder share the runs instead of training any twice.

`run_study` is the local executor: the runs in this process one after another (--jobs 1), or
each in its own spawned process with at most N at a time (--jobs N), one GPU per process
(round-robin) when several GPUs are visible.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bnlab.config import RunConfig, from_json_dict
from bnlab.errors import UserError
from bnlab.spec import Plan, load_spec
from bnlab.store import Store

FINAL = ("completed", "diverged", "no_learning")  # outcomes that are results, never redone
DEFAULT_ROOT = Path("studies-out")


# -- one run -----------------------------------------------------------------------------------
def run_one(cfg: RunConfig, out: str | Path, log: Callable[[str], None] = print,
            wait: bool = True, retry_failed: bool = True) -> dict:
    """Train, resume or skip one run under its lock; return its summary, never raise.

    With wait=False a run locked by another process is left to it: the result is then
    {"run_id": ..., "status": "busy"}. A stored `failed` run is trained again only when
    `retry_failed`.
    """
    from bnlab.train import train_run

    store = Store(out)
    run = store.run(cfg.run_id())
    with store.lock(run.run_id, wait=wait) as held:
        if not held:
            return {"run_id": run.run_id, "status": "busy"}
        summary = run.summary or {}
        status = summary.get("status")
        if status in FINAL or (status == "failed" and not retry_failed):
            return summary
        store.record_attempt(run.run_id, int(summary.get("epochs_done") or 0))
        log(f"{run.run_id}: {'resuming' if summary else 'starting'}")
        try:
            return train_run(cfg, store.root, resume=True, log=log)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - a run's failure must not stop the study
            return _record_failure(store, cfg, e, log)


def _record_failure(store: Store, cfg: RunConfig, e: Exception, log) -> dict:
    run = store.run(cfg.run_id())
    message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    message = " ".join(message.split()) or type(e).__name__
    summary = run.summary or {}
    if summary.get("status") != "failed":  # train.py records failures after setup itself
        if not run.exists():  # it failed before its folder was made: keep the config anyway
            run.write_json("config.json", {"config": cfg.to_dict(), "env": None})
        summary = {"run_id": run.run_id, "epochs": cfg.epochs, "epochs_done": 0,
                   "test_acc": None, "test_loss": None, "train_acc": None,
                   "train_loss": None, "wall_time": 0.0, **summary,
                   "status": "failed", "error": message}
        run.write_json("summary.json", summary)
        store.record(run)
    log(f"{run.run_id}: failed: {message}")
    return summary


# -- progress and log lines --------------------------------------------------------------------
def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Study-wide progress (in epochs, read from the index, so other runners count too): a bar
    with ETA redrawn on a terminal, or plain log lines when output goes to a file or pipe."""

    def __init__(self, plan: Plan, store: Store, stream=None, tty: bool | None = None):
        self.plan, self.store = plan, store
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.total = sum(r.cfg.epochs for r in plan.runs)
        self.done0 = None
        self.shown = False
        self._stop = threading.Event()
        self._thread = None

    def measure(self) -> tuple[int, int, float | None]:
        """(runs finished, epochs done, seconds left or None)."""
        rows = {r["run_id"]: r for r in self.store.rows()}
        runs_done, done = 0, 0
        for r in self.plan.runs:
            row = rows.get(r.run_id)
            if row is None:
                continue
            if row["status"] in (*FINAL, "failed"):
                runs_done += 1
                done += r.cfg.epochs
            else:
                done += min(row["epochs_done"] or 0, r.cfg.epochs)
        if self.done0 is None:
            self.done0 = done
        elapsed = time.monotonic() - self.t0
        rate = (done - self.done0) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else (0.0 if done >= self.total else None)
        return runs_done, done, eta

    def text(self) -> str:
        runs_done, done, eta = self.measure()
        frac = done / self.total if self.total else 1.0
        width = 24
        fill = int(round(frac * width))
        return (f"{self.plan.spec.name} [{'#' * fill}{'.' * (width - fill)}] "
                f"{runs_done}/{len(self.plan.runs)} runs, {done}/{self.total} epochs, "
                f"elapsed {_fmt_time(time.monotonic() - self.t0)}, ETA {_fmt_time(eta)}")

    def log(self, line: str) -> None:
        with self.lock:
            if self.tty and self.shown:
                self.stream.write("\r\033[K")
            print(line, file=sys.stdout if self.stream is sys.stderr else self.stream,
                  flush=True)
            if self.tty:
                self._draw()

    def _draw(self) -> None:
        self.stream.write("\r\033[K" + self.text())
        self.stream.flush()
        self.shown = True

    def finished(self, summary: dict) -> None:
        """A log line for a run that reached a status in this runner."""
        acc = summary.get("test_acc")
        acc_s = f", test acc {acc:.4f}" if isinstance(acc, float) else ""
        wall = summary.get("wall_time")
        wall_s = f", {wall:.1f} s" if isinstance(wall, int | float) else ""
        runs_done, _, eta = self.measure()
        self.log(f"[{runs_done}/{len(self.plan.runs)}] {summary.get('run_id')}: "
                 f"{summary.get('status')}{acc_s}{wall_s}; study ETA {_fmt_time(eta)}")

    def __enter__(self):
        self.measure()
        if self.tty:
            def loop():
                while not self._stop.wait(1.0):
                    with self.lock:
                        self._draw()
            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.tty and self.shown:
            with self.lock:
                self._draw()
                self.stream.write("\n")
                self.stream.flush()


# -- executors ---------------------------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so killing a runner stops its
    workers too (and frees their run locks)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    Runs of a study share the CPU with each other (--jobs) and often with other work; spinning
    threads then steal the time slices of the threads they wait for. Measured on a 2-core
    machine under heavy load: 420 -> 3 ms per step of the MLP, 7.9 -> 1.0 s per ResNet-20 step
    of 128 images. On an idle machine spinning is faster (a ResNet-20 step 15-20%), so
    `bnlab study run` asks for this only with --jobs > 1 or a busy machine. OpenMP reads the
    variable when torch is loaded, so this reaches the workers spawned afterwards (and this
    process only if torch is not loaded yet).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _child(cfg_dict: dict, out: str, wait: bool, retry_failed: bool, msgs, gpu: str | None,
           threads: int, parent: int) -> None:
    _die_with_parent(parent)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch

    torch.set_num_threads(threads)
    cfg = from_json_dict(cfg_dict)
    summary = run_one(cfg, out, log=lambda line: msgs.put(("log", line)), wait=wait,
                      retry_failed=retry_failed)
    msgs.put(("done", cfg.run_id(), summary))


def _gpu_ids(plan: Plan) -> list[str]:
    """The GPUs to spread workers over (only when there are several)."""
    if all(r.cfg.device == "cpu" for r in plan.runs):
        return []
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n <= 1:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(n)]
    return ids[:n]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _run_serial(store: Store, progress: Progress, wait: bool, retry_failed: bool,
                runs) -> list:
    busy = []
    for r in runs:
        s = run_one(r.cfg, store.root, log=progress.log, wait=wait, retry_failed=retry_failed)
        if s.get("status") == "busy":
            busy.append(r)
        else:
            progress.finished(s)
    return busy


def _run_parallel(plan: Plan, store: Store, progress: Progress, jobs: int, wait: bool,
                  retry_failed: bool, runs) -> list:
    passive_openmp()
    ctx = mp.get_context("spawn")
    msgs = ctx.Queue()
    gpus = _gpu_ids(plan)
    threads = max(1, _cores() // jobs)
    todo = list(runs)
    active: dict[str, tuple] = {}  # run_id -> (process, run, gpu)
    done: dict[str, dict] = {}
    busy = []

    def drain(timeout: float) -> None:
        try:
            item = msgs.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            if item[0] == "log":
                progress.log(item[1])
            else:
                done[item[1]] = item[2]
            try:
                item = msgs.get_nowait()
            except queue.Empty:
                return

    try:
        while todo or active:
            while todo and len(active) < jobs:
                r = todo.pop(0)
                gpu = None
                if gpus:
                    load = {g: 0 for g in gpus}
                    for _, _, g in active.values():
                        load[g] += 1
                    gpu = min(gpus, key=lambda g: load[g])
                # not a daemon: a run may start DataLoader workers of its own
                p = ctx.Process(target=_child,
                                args=(r.cfg.to_dict(), str(store.root), wait, retry_failed, msgs,
                                      gpu, threads, os.getpid()))
                p.start()
                active[r.run_id] = (p, r, gpu)
            drain(0.5)
            for run_id, (p, r, _) in list(active.items()):
                if p.exitcode is None:
                    continue
                drain(0.0)
                p.join()
                del active[run_id]
                s = done.pop(run_id, None)
                if s is None:  # the worker died without a word (segfault, OOM kill, ...)
                    s = run_one_crashed(store, r.cfg, p.exitcode, progress.log)
                if s.get("status") == "busy":
                    busy.append(r)
                else:
                    progress.finished(s)
    finally:
        for p, _, _ in active.values():
            p.kill()
            p.join()
    return busy


def run_one_crashed(store: Store, cfg: RunConfig, exitcode: int | None, log) -> dict:
    """Record a run whose worker process died, unless the run had finished anyway."""
    with store.lock(cfg.run_id(), wait=True):
        summary = store.run(cfg.run_id()).summary or {}
        if summary.get("status") in (*FINAL, "failed"):
            return summary
        return _record_failure(store, cfg, RuntimeError(
            f"worker process died with exit code {exitcode}"), log)


def open_study_store(plan: Plan, out: str | Path) -> Store:
    """The study's output root with its study.json written; refuses a root of another study."""
    store = Store(out)
    old = store.read_meta("study.json")
    if old is not None and old.get("name") != plan.spec.name:
        raise UserError(f"{str(store.root)!r} holds the results of study {old.get('name')!r}, "
                        f"not {plan.spec.name!r}: pass another --out")
    store.write_meta("study.json", plan.study_json())
    return store


def run_study(plan: Plan, out: str | Path, jobs: int = 1, tty: bool | None = None,
              pack: bool = True) -> dict:
    """Run every run of `plan` into `out`; return {status: count} over the plan's runs.

    With `pack`, CUDA runs that differ only in what bnlab.packed can vary (seed, lr, ...) train
    together as one packed network first; the rest go to the executor one by one.
    """
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    store = open_study_store(plan, out)
    progress = Progress(plan, store, tty=tty)
    finished = {r.run_id for r in plan.runs
                if (store.run(r.run_id).summary or {}).get("status") in FINAL}
    todo = [r for r in plan.runs if r.run_id not in finished]
    progress.log(f"study {plan.spec.name}: {len(plan.runs)} runs, {len(finished)} already "
                 f"finished, {len(todo)} to run, --jobs {jobs} -> {store.root}")

    def execute(wait: bool, retry_failed: bool, runs) -> list:
        if jobs == 1:
            return _run_serial(store, progress, wait, retry_failed, runs)
        return _run_parallel(plan, store, progress, jobs, wait, retry_failed, runs)

    with progress:
        if pack:
            todo = _run_packed(store, progress, todo)
        busy = execute(False, True, todo)
        if busy:  # held by another runner: wait for it, and take over if it dies
            progress.log(f"{len(busy)} runs are being trained by another process; waiting")
            execute(True, False, busy)
    counts = count_statuses(store, plan)
    if plan.spec.analysis.get("compare") and set(counts) <= {*FINAL, "failed"}:
        compare_selected(store, plan, progress.log)
    return counts


PACK_DEVICES = {"cuda"}  # device types whose runs a study packs


def _run_packed(store: Store, progress: Progress, todo: list) -> list:
    """Train the packable CUDA runs of `todo` in packs of up to 16; return the runs left.

    Packing pays on GPUs only (on the CPU a grouped network costs more per model-image, see
    docs/speed.md), so CPU runs are never packed. A pack takes every member's lock without
    waiting; if another runner holds one of them, the group is left to the usual path.
    """
    from contextlib import ExitStack

    from bnlab.packed import pack_groups, train_packed
    from bnlab.train import resolve_device

    packable = [r for r in todo if resolve_device(r.cfg.device).type in PACK_DEVICES]
    done: set[str] = set()
    for group in pack_groups([r.cfg for r in packable], max_k=16):
        if len(group) < 2:
            continue
        with ExitStack() as stack:
            held = [stack.enter_context(store.lock(c.run_id(), wait=False)) for c in group]
            if not all(held):
                continue
            for c in group:
                s = store.run(c.run_id()).summary or {}
                store.record_attempt(c.run_id(), int(s.get("epochs_done") or 0))
            for summary in train_packed(group, store.root, resume=True, log=progress.log):
                progress.finished(summary)
        done |= {c.run_id() for c in group}
    return [r for r in todo if r.run_id not in done]


def compare_selected(store: Store, plan: Plan, log) -> None:
    """analysis.compare: compare the predictions of the selected arms (bnlab.infer.compare),
    one finished run per arm (its lowest seed), into OUT/analysis/ for the study's first
    dataset with two such arms and OUT/analysis/<dataset>/ for the others. Skipped when the
    comparison of the same runs exists; a failure is logged, never raised."""
    from bnlab.infer.compare import compare_runs
    from bnlab.report.arms import INCLUDED, build_arms
    from bnlab.report.load import load_study
    from bnlab.train import resolve_device

    arms = [a for a in build_arms(load_study(store.root)) if a.selected]
    device = resolve_device(plan.runs[0].cfg.device).type
    first = True
    for dataset in dict.fromkeys(a.dataset for a in arms):
        picks = []
        for a in arms:
            done = [r for r in a.runs if a.dataset == dataset and r.status in INCLUDED
                    and store.run(r.run_id).checkpoint_path.is_file()]
            if done:
                run = min(done, key=lambda r: (str(r.seed), r.run_id))
                picks.append((run.run_id, a.label))
        if len(picks) < 2:
            continue
        folder = store.root / "analysis" if first else store.root / "analysis" / dataset
        first = False
        old = store.read_meta(str((folder / "compare.json").relative_to(store.root))) \
            if (folder / "compare.json").is_file() else None
        if old and [m["run_id"] for m in old.get("models", [])] == [p[0] for p in picks]:
            continue
        log(f"comparing the predictions of {len(picks)} arms on {dataset}: "
            + ", ".join(label for _, label in picks))
        try:
            compare_runs([store.run(rid) for rid, _ in picks], folder,
                         labels=[label for _, label in picks], device=device, log=log)
        except Exception as e:  # noqa: BLE001 - the runs are the result; the comparison is extra
            log(f"prediction comparison on {dataset} failed: {type(e).__name__}: {e}")


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


def status_text(out: str | Path) -> str:
    """`bnlab study status`: counts by status, then one line per run with its axis values."""
    from bnlab.cli import format_table

    store = Store(out)
    meta = store.read_meta("study.json")
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
    from bnlab.cli import format_table
    from bnlab.spec import builtin_names, expand

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
