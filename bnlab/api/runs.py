"""One run from Python (`bnlab train`), the runs of an output folder (`bnlab runs`), and the
results of a folder as DataFrames."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.api import checks
from bnlab.api.frames import frame, metric_frame
from bnlab.config import RunConfig, load, to_flags
from bnlab.errors import UserError
from bnlab.store import RunDir, Store, open_store
from bnlab.train import train_run as train_config
from bnlab.train.distributed import detect, launch

Folder = str | Path


class LaunchFailed(RuntimeError):
    """torchrun (train_run with nproc > 0) exited with a status other than 0; its processes'
    output says why. `returncode` is that status (the command exits with it)."""

    def __init__(self, returncode: int):
        super().__init__(f"torchrun exited with status {returncode} (its processes' output "
                         "says why)")
        self.returncode = returncode


@dataclass
class Run:
    """A trained (or refused, failed, resumed) run: its folder and stored results.
    `main_process` is False in a process other than rank 0 under torchrun (nothing written)."""

    run_id: str
    path: Path
    summary: dict
    config: dict
    main_process: bool = field(default=True, compare=False)

    @classmethod
    def open(cls, path: Folder) -> Run:
        run = RunDir(checks.folder("path", path))
        if not run.exists():
            raise UserError(f"{str(path)!r} is not a run folder (no config.json)")
        return cls(run.run_id, run.path, run.summary or {}, run.config)

    @property
    def status(self) -> str:
        return self.summary.get("status", "running")

    @property
    def test_acc(self) -> float | None:
        return self.summary.get("test_acc")

    def metrics(self):
        """metrics.jsonl as a DataFrame: one row per epoch, columns in the run folder's order
        (epoch, step, lr, train_loss, train_acc, test_loss, test_acc, test_acc5, val_loss,
        val_acc, epoch_time, train_images_per_s; those the run recorded)."""
        return metric_frame(RunDir(self.path).metrics())

    def probes(self):
        """probes.jsonl as a DataFrame: step, epoch, layer, metric, value (empty without
        probes)."""
        return frame(RunDir(self.path).read_rows("probes.jsonl"),
                     ["step", "epoch", "layer", "metric", "value"])

    def line(self) -> str:
        """The line `bnlab train` prints for it."""
        s, acc = self.summary, self.summary.get("test_acc")
        return (f"{self.run_id}: {s['status']}, {s['epochs_done']} epochs, "
                f"test acc {acc if acc is None else f'{acc:.4f}'}, "
                f"{s['wall_time']:.1f} s -> {self.path}")


def train_run(dataset: str | None = None, model: str | None = None, norm: str | None = None,
              epochs: int | None = None, *, out: Folder = "runs", config: Folder | None = None,
              resume: bool = False, nproc: int = 0, log: Callable[[str], None] = print,
              **options: Any) -> Run:
    """`bnlab train`: one run into OUT/<run_id>/. Options are RunConfig's fields (`bnlab train
    --help`), over the TOML file `config` when given; nproc > 0 trains data-parallel under
    torchrun like --nproc (LaunchFailed when torchrun fails)."""
    out = checks.folder("out", out)
    config = checks.folder("config", config, optional=True)
    resume = checks.flag("resume", resume)
    nproc = checks.integer("nproc", nproc, 0)
    if not callable(log):
        raise UserError(f"log must be a function of one string, got {checks.shown(log)}")
    named = {"dataset": dataset, "model": model, "norm": norm, "epochs": epochs}
    cfg = load(config, {**{k: v for k, v in named.items() if v is not None}, **options})
    if cfg.precision == "auto":
        cfg = _choose_precision(cfg, nproc, log)
    if nproc:
        rc = launch(nproc, _train_argv(cfg, out, resume), cfg)
        if rc != 0:
            raise LaunchFailed(rc)
        return Run.open(out / cfg.run_id())
    summary = train_config(cfg, out, resume=resume, log=log)
    run = Store(out).run(cfg.run_id())
    if not detect().is_main:  # a process other than rank 0 under torchrun: nothing written
        return Run(cfg.run_id(), run.path, summary, cfg.to_dict(), main_process=False)
    return Run(cfg.run_id(), run.path, summary, run.config or cfg.to_dict())


def _choose_precision(cfg: RunConfig, nproc: int, log: Callable[[str], None]) -> RunConfig:
    """precision "auto" made fp32 or bf16 for this machine (bnlab.study.calibrate), once,
    before the run id is made and before --nproc's processes start."""
    import dataclasses

    from bnlab import machine
    from bnlab.runtime import resolve_device
    from bnlab.study.calibrate import choose_precision

    if detect().world_size > 1:
        raise UserError("precision 'auto' is chosen once before the processes start: train with "
                        "--nproc N, or give --precision fp32 or bf16 under torchrun")
    device = resolve_device(cfg.device).type
    threads = max(1, machine.usable_cores() // max(1, nproc))
    chosen, why = choose_precision(device, cfg.batch_size, threads, log)
    log(f"precision auto: {chosen} ({why})")
    return dataclasses.replace(cfg, precision=chosen)


def _train_argv(cfg: RunConfig, out: Folder, resume: bool) -> list[str]:
    """`bnlab train` arguments that rebuild `cfg` in the processes torchrun starts."""
    return ["--out", str(out)] + (["--resume"] if resume else []) + to_flags(cfg.to_dict())


# -- the runs of an output folder --------------------------------------------------------------
def rebuild_index(out: Folder) -> tuple[Path, int]:
    """`bnlab runs --rebuild-index`: OUT/index.sqlite rebuilt from the run folders (a damaged
    index is kept as index.sqlite.damaged); returns (its path, the number of run folders)."""
    store = open_store(checks.folder("out", out), must_exist=True)
    return store.index_path, store.rebuild_index()


def run_rows(out: Folder) -> list[dict]:
    """`bnlab runs`: the index's rows (run_id, status, dataset, norm, seed, epochs_done,
    epochs, test_acc, wall_time, ...) checked against the run folders (the truth); a
    writable index is brought up to date, a read-only folder is only read."""
    return open_store(checks.folder("out", out), must_exist=True, readonly=None).reconcile()
