"""Study-wide progress: a bar with an ETA on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
import threading
import time

from bnlab.console import fmt_time
from bnlab.store import FINISHED, Store
from bnlab.study.spec import Plan


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
            if row["status"] in (*FINISHED, "failed"):
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
                f"elapsed {fmt_time(time.monotonic() - self.t0)}, ETA {fmt_time(eta)}")

    def log(self, line: str) -> None:
        with self.lock:
            if self.tty and self.shown:
                self.stream.write("\r\033[K")
            # one write per line: print() writes the text and its newline separately, and a
            # worker process sharing the stream can land between them, splitting the line
            out = sys.stdout if self.stream is sys.stderr else self.stream
            out.write(line + "\n")
            out.flush()
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
                 f"{summary.get('status')}{acc_s}{wall_s}; study ETA {fmt_time(eta)}")

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


