"""A run's folder as its training loop keeps it: the one copy that both loops (a lone run,
bnlab.train.loop, and each run of a pack, bnlab.train.packed) and the study runner use.

    verdict()     before training: train it (new or resumed), return its finished summary, or
                  refuse (it exists and resume was not asked for, or another world size)
    check_data()  refuse (DataMismatch) to resume or reuse a run trained on other data
    load_checkpoint() the last checkpoint; a damaged one is moved aside and the run starts
                  again from scratch, which its summary records (`restarted`)
    resume_from() take epoch, step, wall time, flags and metrics from a loaded checkpoint
    begin()       config.json and an empty metrics.jsonl for a new run; a `running` summary
    add_epoch()   one epoch's metrics row (bnlab.store.EpochRow), in memory (and the flag of
                  an early stall)
    save()        metrics.jsonl, checkpoint.pt and the `running` summary, each atomically (and
                  the epoch's TensorBoard scalars with the run option tensorboard, board.py)
    diverged()    the step whose loss was not finite
    finish()      the final summary (status from bnlab.store.final_status)
    fail()        error.txt and a `failed` summary

A record made with `store=None` (the processes other than rank 0 of a data-parallel run) keeps
the same progress in memory and writes nothing. Every file goes through bnlab.store, so each
write replaces the previous complete file.

The checkpoint is the run's state; the other files are read back only where they are whole: a
resumed run takes its metrics rows from the checkpoint (a torn metrics.jsonl is written again
whole), a damaged summary.json counts as an interrupted run, a damaged config.json is written
again. A failure to write (disk full, read-only) is a StorageError that leaves the run
`running` with its last checkpoint, so `--resume` continues it once there is space.
"""

from __future__ import annotations

import math
import os
import traceback
from collections.abc import Callable

import torch
from torch import nn

from bnlab.config import RunConfig
from bnlab.data import DataBundle, fingerprint
from bnlab.errors import DataMismatch, StorageError, UserError, storage_error
from bnlab.models import count_parameters
from bnlab.models.norm_summary import norm_layers
from bnlab.runtime import environment
from bnlab.store import (
    CHECKPOINT_KEYS,
    FINISHED,
    EpochRow,
    RunDir,
    Store,
    final_status,
    warn,
)
from bnlab.train.board import EpochBoard


def config_record(cfg: RunConfig, bundle, model: nn.Module, device: torch.device,
                  steps_per_epoch: int) -> dict:
    """The content of a run's config.json."""
    return {
        "config": cfg.to_dict(), "env": environment(device),
        "data": {"name": bundle.name, "classes": bundle.classes, "n_train": len(bundle.train),
                 "n_test": len(bundle.test), "image_size": bundle.image_size,
                 "n_val": 0 if bundle.val is None else len(bundle.val),
                 "mean": bundle.mean, "std": bundle.std, "streamed": bundle.streamed,
                 "fingerprint": bundle.fingerprint},
        "model": {"parameters": count_parameters(model), "steps_per_epoch": steps_per_epoch,
                  # the norm layers as built, with the options each resolved to (GroupNorm(8))
                  "norm_layers": norm_layers(model)}}


def checkpoint_state(cfg: RunConfig, model: nn.Module, opt: torch.optim.Optimizer, epoch: int,
                     step: int, wall: float, flags: dict, device: torch.device) -> dict:
    """What checkpoint.pt holds: model, optimizer, progress and the RNG states."""
    optimizer = opt.state_dict()
    for g in optimizer["param_groups"]:  # a graphed step's device-tensor lr is stored as a number
        if isinstance(g["lr"], torch.Tensor):
            g["lr"] = float(g["lr"])
    return {
        "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer,
        "epoch": epoch, "step": step, "wall_time": wall, "flags": flags,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def summary_of(cfg: RunConfig, status: str, metrics: list[dict], wall: float,
               flags: dict) -> dict:
    """summary.json: the status and the last epoch's numbers."""
    last = metrics[-1] if metrics else {}
    return {
        "run_id": cfg.run_id(), "status": status, "epochs_done": len(metrics),
        "epochs": cfg.epochs, "test_acc": last.get("test_acc"),
        "test_loss": last.get("test_loss"), "train_acc": last.get("train_acc"),
        "train_loss": last.get("train_loss"), "wall_time": wall, **flags,
        **({"val_acc": last["val_acc"], "val_loss": last.get("val_loss")}
           if "val_acc" in last else {}),
    }


def error_message(e: BaseException) -> str:
    """One line for a summary: a UserError's own message, else the exception's type and text."""
    text = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split()) or type(e).__name__


class RunRecord:
    """One run's progress and folder (see the module docstring)."""

    def __init__(self, store: Store | None, cfg: RunConfig):
        self.store, self.cfg = store, cfg
        self.run: RunDir | None = store.run(cfg.run_id()) if store is not None else None
        self.epoch, self.step, self.wall = 0, 0, 0.0
        self.metrics: list[dict] = []
        self.flags: dict = {}
        self.board: EpochBoard | None = None  # TensorBoard scalars (cfg.tensorboard), from begin()

    @property
    def run_id(self) -> str:
        return self.cfg.run_id()

    @property
    def writes(self) -> bool:
        return self.run is not None

    # -- before training -----------------------------------------------------------------------
    def verdict(self, resume: bool, world_size: int = 1) -> dict | str | None:
        """None to train, a finished run's summary to return as it is, or the message of the
        UserError that refuses to touch the run."""
        run = self.run
        if not run.exists():
            return None
        summary = run.summary or {}
        if not resume:
            return (f"run {run.run_id!r} already exists in {str(self.store.root)!r} "
                    f"(status {summary.get('status', 'running')}); pass --resume to "
                    "continue it or --out to start elsewhere")
        if summary.get("status") in FINISHED:
            return summary
        world = (self._stored().get("distributed") or {}).get("world_size", 1)
        if world != world_size:
            return (f"run {run.run_id!r} was trained by {world} process(es); resume it with "
                    f"{world} (the per-device batch, and so BN, depends on it), not "
                    f"{world_size}")
        return None

    def _stored(self) -> dict:
        """config.json as stored ({} when missing or damaged, an option of the wrong type
        included: begin() writes it again)."""
        try:
            stored = self.run.stored()
        except StorageError:
            raise
        except UserError:
            return {}
        return stored if isinstance(stored, dict) else {}

    def stored_fingerprint(self) -> str | None:
        """The fingerprint of the data the run was trained on, where its folder has one."""
        if self.run is None or not self.run.exists():
            return None
        return (self._stored().get("data") or {}).get("fingerprint")

    def check_data(self, bundle: DataBundle | None = None) -> None:
        """Raise DataMismatch when this run folder holds a run trained on other data than
        `bundle` (bnlab.data fingerprints), or, without a bundle, than the data its config names
        (read only when the folder holds a fingerprint to compare with). Nothing to compare (a
        new run, data made in memory, an older record) passes.

        Checked wherever a stored run is resumed or taken as done, rather than made part of the
        run id: ids then stay computable from the config alone (status, reports and cluster
        submission need no data), and the same data read from another place keeps its
        results."""
        stored = self.stored_fingerprint()
        if stored is None:
            return
        cfg = self.cfg
        fp = bundle.fingerprint if bundle is not None else fingerprint(
            cfg.dataset, cfg.data_dir or None, cfg.download)
        if fp is None or fp == stored:
            return
        raise DataMismatch(
            f"run {self.run_id!r} in {str(self.store.root)!r} was trained on other data "
            f"(fingerprint {stored}; the data of {cfg.dataset!r} here is {fp}): point "
            "--data-dir at the data it was trained on, or give another --out")

    def load_checkpoint(self, map_location="cpu") -> dict | None:
        """The run's last checkpoint, or None for a new run (or on a non-writing process).

        A checkpoint that cannot be read or lacks an entry is moved aside (checkpoint.pt.damaged)
        and the run starts again from scratch, recorded in its flags (`restarted`): retrying
        would fail the same way for ever, and its epochs cannot be trusted."""
        if self.run is None or not self.run.exists():
            return None
        try:
            state = self.run.load_checkpoint(map_location=map_location)
            missing = [k for k in CHECKPOINT_KEYS if state is not None and k not in state]
            if missing:
                raise UserError(f"{str(self.run.checkpoint_path)!r} lacks {', '.join(missing)}")
        except StorageError:
            raise
        except UserError as e:
            kept = self.run.path / "checkpoint.pt.damaged"
            try:
                os.replace(self.run.checkpoint_path, kept)
            except OSError as err:
                raise storage_error(self.run.checkpoint_path, err, "move aside") from None
            why = " ".join(str(e).split())
            self.flags = {"restarted": f"{why}; kept as {kept.name}, trained again from scratch"}
            warn(f"{self.run_id}: {why}; the run starts again from scratch (the file is kept "
                 f"as {kept.name})")
            return None
        return state

    def resume_from(self, state: dict) -> None:
        """Progress from a checkpoint; the metrics rows it holds (older checkpoints hold none:
        then metrics.jsonl's rows of its epochs, a row written after the checkpoint by a run
        killed in between being dropped and made again)."""
        self.epoch, self.step, self.wall = state["epoch"], state["step"], state["wall_time"]
        self.flags = dict(state.get("flags", {}))
        if isinstance(state.get("metrics"), list):
            self.metrics = [dict(m) for m in state["metrics"]]
        elif self.run is not None:
            self.metrics = [m for m in self.run.metrics() if m["epoch"] <= self.epoch]

    def begin(self, config: dict | Callable[[], dict]) -> None:
        """config.json (a dict, or a function making it) and empty metrics for a run that starts
        from scratch (no checkpoint yet), config.json again where it was damaged; then a
        `running` summary and the index row."""
        if self.run is None:
            return
        fresh = not self.run.checkpoint_path.is_file()
        if fresh or not self._stored().get("config"):
            self.run.write_json("config.json", config() if callable(config) else config)
        if fresh:
            self.run.write_rows("metrics.jsonl", [])
        elif self.metrics != self.run.metrics():  # torn or behind the checkpoint: made whole
            self.run.write_rows("metrics.jsonl", self.metrics)
        if self.cfg.tensorboard and self.board is None:
            self.board = EpochBoard(self.store.root, self.cfg, self.epoch)
        self._write_summary("running")

    # -- during training -----------------------------------------------------------------------
    def add_epoch(self, row: EpochRow, chance: float) -> None:
        """Keep one finished epoch's row (stored as metrics.jsonl's object, row.to_dict()).
        While every epoch so far has been at or below `chance`, the flag
        `at_chance_until_epoch` follows the epochs: it stays as the record of a slow start
        once the run learns."""
        self.metrics.append(row.to_dict())
        self.epoch, self.step = row.epoch, row.step
        self.wall += row.epoch_time
        loss = row.test_loss
        if isinstance(loss, float) and not math.isfinite(loss) \
                and "diverged_step" not in self.flags:
            # the model's outputs on the test set overflow (a train loss of 3e10 stays finite,
            # its logits do not): the run diverged, though no training loss was non-finite
            self.flags.setdefault("test_loss_nonfinite_epoch", row.epoch)
        stalled = all(m["test_acc"] <= chance for m in self.metrics)
        if stalled:
            self.flags["at_chance_until_epoch"] = row.epoch

    def save(self, checkpoint: dict) -> None:
        """metrics.jsonl, the checkpoint and (before the last epoch) a `running` summary."""
        if self.run is None:
            return
        self.run.write_rows("metrics.jsonl", self.metrics)
        if self.board is not None and self.metrics:
            self.board.add(self.metrics[-1])  # before the checkpoint: a resume purges it
        self.run.save_checkpoint({**checkpoint, "metrics": self.metrics})
        if self.epoch < self.cfg.epochs:
            self._write_summary("running")

    def diverged(self, step: int, elapsed: float, log: Callable[[str], None]) -> None:
        """The loss became non-finite at `step`; `elapsed` seconds of the unfinished epoch."""
        self.flags["diverged_step"] = int(step)
        self.wall += elapsed
        log(f"{self.run_id}: loss became non-finite at step {int(step)}; stopping (status "
            "diverged)")

    # -- the end -------------------------------------------------------------------------------
    def summary(self, status: str) -> dict:
        return summary_of(self.cfg, status, self.metrics, self.wall, self.flags)

    def finish(self, chance: float | None = None) -> dict:
        """Write and return the final summary; `chance` decides whether the last test accuracy
        is at chance (status no_learning; not asked of a run that diverged)."""
        last = self.metrics[-1]["test_acc"] if self.metrics else None
        at_chance = chance is not None and last is not None and last <= chance
        status = final_status(self.flags, at_chance)
        self._close_board(status)
        return self._write_summary(status)

    def _close_board(self, status: str) -> None:
        if self.board is not None:
            self.board.close(status)
            self.board = None

    def fail(self, e: BaseException) -> dict:
        """error.txt (the traceback) and a `failed` summary that keeps what the run had done;
        a run that failed before its folder existed keeps at least its config."""
        if self.run is None:
            return {"run_id": self.run_id, "status": "failed", "error": error_message(e)}
        self._close_board("failed")
        run = self.run
        if not run.exists():
            run.write_json("config.json", {"config": self.cfg.to_dict(), "env": None})
        run.write_text("error.txt", "".join(traceback.format_exception(e)))
        stored, own = run.summary or {}, self.summary("failed")
        # the progress of a record that trained is newer than the folder's (the last epoch's
        # save writes no summary: finish does); a record that trained nothing knows less
        summary = {**stored, **own} if self.metrics else {**own, **stored}
        summary |= {"status": "failed", "error": error_message(e)}
        run.write_json("summary.json", summary)
        self.store.record(run)
        return summary

    def _write_summary(self, status: str) -> dict:
        summary = self.summary(status)
        if self.run is not None:
            self.run.write_json("summary.json", summary)
            self.store.record(self.run)
        return summary


def record_failure(store: Store, cfg: RunConfig, e: BaseException,
                   log: Callable[[str], None]) -> dict:
    """A study's record of a run that raised: the run's own `failed` summary when training
    recorded this error already, else a new one (its config kept even when the folder did not
    exist). An earlier attempt's failure is replaced: a retry can fail for another reason
    before training records anything (its data, its model)."""
    rec = RunRecord(store, cfg)
    summary = rec.run.summary or {}
    if summary.get("status") != "failed" or summary.get("error") != error_message(e):
        summary = rec.fail(e)
    log(f"{rec.run_id}: failed: {error_message(e)}")
    return summary
