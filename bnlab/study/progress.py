"""Study-wide progress: a tqdm bar with a measured ETA on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm

from bnlab.console import fmt_time
from bnlab.store import FINISHED, Store
from bnlab.study.expand import Plan

REFRESH_S = 1.0  # how often the bar rereads the index (other runners' epochs count too)


class Progress:
    """Study-wide progress in epochs, read from the index so other runners count too: a bar on
    a terminal (log lines are written above it), or plain log lines when output goes to a file
    or pipe. The ETA is measured: epochs still to train over the rate of epochs done since
    this runner started."""

    quiet = False  # the bar only, no log lines (a notebook's Study.run(log=False))

    def __init__(self, plan: Plan, store: Store, stream=None, tty: bool | None = None,
                 quiet: bool = False):
        self.plan, self.store = plan, store
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        # log lines are results, the bar is decoration: lines go to stdout when the bar is on
        # stderr, so `bnlab study run ... > log` keeps every line and no bar
        self.out = sys.stdout if self.stream is sys.stderr else self.stream
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.total = sum(r.cfg.epochs for r in plan.all_runs)
        self.done0 = None
        self.bar: tqdm | None = None
        self._stop = threading.Event()
        self._thread = None

    def measure(self) -> tuple[int, int, float | None]:
        """(runs finished, epochs done, seconds left or None)."""
        rows = {r["run_id"]: r for r in self.store.rows()}
        runs_done, done = 0, 0
        for r in self.plan.all_runs:
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

    def log(self, line: str) -> None:
        if self.quiet:
            return
        with self.lock:
            # one write per line: print() (and tqdm.write) write the text and its newline
            # separately, and a worker process sharing the stream can land between them
            if self.bar is not None:  # clears the bar, writes, redraws it
                self.bar.write(line + "\n", file=self.out, end="")
            else:
                self.out.write(line + "\n")
                self.out.flush()

    def _update(self) -> None:
        runs_done, done, eta = self.measure()
        self.bar.n = done
        self.bar.set_postfix_str(f"{runs_done}/{len(self.plan.all_runs)} runs, ETA {fmt_time(eta)}",
                                 refresh=False)
        self.bar.refresh()

    def finished(self, summary: dict) -> None:
        """A log line for a run that reached a status in this runner."""
        acc = summary.get("test_acc")
        acc_s = f", test acc {acc:.4f}" if isinstance(acc, float) else ""
        wall = summary.get("wall_time")
        wall_s = f", {wall:.1f} s" if isinstance(wall, int | float) else ""
        runs_done, _, eta = self.measure()
        self.log(f"[{runs_done}/{len(self.plan.all_runs)}] {summary.get('run_id')}: "
                 f"{summary.get('status')}{acc_s}{wall_s}; study ETA {fmt_time(eta)}")

    def __enter__(self):
        self.measure()
        if self.tty:
            self.bar = tqdm(total=self.total, initial=self.done0, desc=self.plan.spec.name,
                            file=self.stream, dynamic_ncols=True, leave=True,
                            bar_format="{desc} {bar} {n_fmt}/{total_fmt} epochs, "
                                       "elapsed {elapsed}{postfix}")
            with self.lock:
                self._update()

            def loop():
                while not self._stop.wait(REFRESH_S):
                    with self.lock:
                        self._update()
            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.bar is not None:
            with self.lock:
                self._update()
                self.bar.close()
                self.bar = None
