"""TensorBoard event files of a run (run option `tensorboard`), so that `tensorboard --logdir OUT`
shows every run of an output folder, while they train:

    OUT/tensorboard/<name>/          the epoch metrics of metrics.jsonl as scalars, at step =
                                     epoch (tags metrics/test_acc, metrics/train_loss, ...),
                                     and the run as a session of TensorBoard's HParams tab
    OUT/tensorboard/<name>/steps/    the training loss of every step of the first epoch, at
                                     step = optimizer step (tag first_epoch/train_loss), so a
                                     divergence at step 2 shows on a curve
    OUT/tensorboard/<name>/probes/   with probe_every > 0: every probe as a scalar and each
                                     recorded activation as a histogram, at step = optimizer step
                                     (tags <metric>/<layer>, act/<layer>)

<name> is the run id; for a run of a study (listed in OUT/study.json) it is its arm and seed,
e.g. `norm=bn,lr=0.1/seed0`: the values of the study's varying axes other than seed, then the
seed.

HParams: each run is a session whose hyperparameters are the values that tell its arm from the
others (a study's varying axes other than seed; a lone run's model, norm, dataset and seed and
every option that changes the run and is not at its default), grouped by arm (every seed of an
arm in one session group, so the tab compares arms with the spread over seeds), and that ends
with the run's status (completed and no_learning as success, diverged and failed as failure).
Its metric columns are the run's scalar tags: the last value of metrics/test_acc is the final
epoch's. A run purges what a killed attempt wrote after its last checkpoint (everything, when it
starts from scratch), so every step shows once. Writers are the optional tensorboard
package's (the `tensorboard` extra).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from bnlab.config import FIELDS, NOT_IN_ID, RunConfig
from bnlab.errors import UserError
from bnlab.numbers import fmt_value

BOARD_DIR = "tensorboard"
NOT_IN_NAME = ("seed",)  # the seed is the name's last part; every other varying axis names the arm
STEPS_DIR = "steps"  # the first epoch's step losses, in a folder (and writer) of their own
ALWAYS = ("model", "norm", "dataset", "seed")  # hyperparameters of every lone run
SUCCESS = ("completed", "no_learning")  # statuses that end a session as a success


def _text(v) -> str:
    """A value in a run's folder name: fmt_value's text, a dict as compact JSON (no spaces)."""
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return fmt_value(v)


def _study_values(root: str | Path, cfg: RunConfig) -> tuple[list[str], dict] | None:
    """(the study's axes, this run's values) when OUT/study.json lists the run, else None."""
    study = Path(root) / "study.json"
    meta = json.loads(study.read_text()) if study.is_file() else {}
    runs = {r.get("run_id"): r.get("values") or {} for r in meta.get("runs") or []}
    if cfg.run_id() not in runs:
        return None
    return list(meta.get("axes") or []), runs[cfg.run_id()]


def _arm(axes: list[str], values: dict) -> str:
    arm = ",".join(f"{a}={_text(values.get(a))}" for a in axes if a not in NOT_IN_NAME)
    # one path component per part: a value holding a slash must not open a folder
    return re.sub(r"[/\\]", "_", arm) or "all"


def run_name(root: str | Path, cfg: RunConfig) -> str:
    """The run's folder name under OUT/tensorboard (see the module docstring)."""
    study = _study_values(root, cfg)
    if study is None:
        return cfg.run_id()
    axes, values = study
    return f"{_arm(axes, values)}/seed{_text(values.get('seed', cfg.seed))}"


def _hp_value(v):
    """A value as TensorBoard's HParams take it: a bool, a number or text."""
    return v if isinstance(v, bool | int | float | str) else _text(v)


def hparams_of(root: str | Path, cfg: RunConfig) -> tuple[dict, str]:
    """(hyperparameters, session group) of the run in the HParams tab (module docstring)."""
    study = _study_values(root, cfg)
    if study is not None:
        axes, values = study
        hp = {a: _hp_value(values.get(a)) for a in axes if a not in NOT_IN_NAME}
        return hp, _arm(axes, values)
    defaults = RunConfig()
    hp = {k: _hp_value(getattr(cfg, k)) for k in FIELDS
          if k in ALWAYS or (k not in NOT_IN_ID and k != "model_source"
                             and getattr(cfg, k) != getattr(defaults, k))}
    return hp, ""


def _hparams_summary(tag_kind: str, **data):
    """A Summary proto of the HParams plugin: session_start_info or session_end_info."""
    from tensorboard.compat.proto.summary_pb2 import Summary  # optional: tensorboard extra
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
    tag = {"start": metadata.SESSION_START_INFO_TAG, "end": metadata.SESSION_END_INFO_TAG}
    return Summary(value=[Summary.Value(tag=tag[tag_kind],
                                        metadata=metadata.create_summary_metadata(content))])


def session_start(hparams: dict, group: str):
    from tensorboard.plugins.hparams import plugin_data_pb2  # optional: tensorboard extra

    info = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=time.time())
    for k, v in hparams.items():
        if isinstance(v, bool):
            info.hparams[k].bool_value = v
        elif isinstance(v, int | float):
            info.hparams[k].number_value = float(v)
        else:
            info.hparams[k].string_value = str(v)
    return _hparams_summary("start", session_start_info=info)


def session_end(status: str):
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2  # optional: tensorboard

    code = api_pb2.STATUS_SUCCESS if status in SUCCESS else api_pb2.STATUS_FAILURE
    info = plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=time.time())
    return _hparams_summary("end", session_end_info=info)


def event_dir(root: str | Path, cfg: RunConfig) -> Path:
    return Path(root) / BOARD_DIR / run_name(root, cfg)


def _writer_class():
    try:
        # optional: the tensorboard extra
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("tensorboard output needs the tensorboard package "
                        "(pip install 'bnlab[tensorboard]')") from None
    return SummaryWriter


def require_tensorboard() -> None:
    """Refuse the run option tensorboard before a study starts, not in each of its runs."""
    _writer_class()


EVENT_PREFIX = "events.out.tfevents."  # then the second the file was opened (%010d), host, ...


def _last_second(folder: Path) -> int:
    """The latest second in the names of the event files in `folder` (-1: none)."""
    seconds = [int(f.name[len(EVENT_PREFIX):].split(".", 1)[0])
               for f in folder.glob(EVENT_PREFIX + "*")
               if f.name[len(EVENT_PREFIX):].split(".", 1)[0].isdigit()]
    return max(seconds, default=-1)


def summary_writer(folder: Path, purge_step: int | None = None):
    """A SummaryWriter into `folder`; events at steps >= purge_step from an earlier attempt are
    hidden (None: nothing hidden, for writers of their own folder only). A run passes its start
    step even when it starts from scratch: an attempt killed before its first checkpoint
    has written events already.

    TensorBoard reads a folder's event files in the order of their names, and hides earlier
    events only when the file that asks for it comes later. A name is the second the file was
    opened, then the host, the process id and a per-process counter as text (neither of which
    orders two files of one second: pid 900 after pid 1000, counter "9" after "10"; a
    filename_suffix comes after them all). So a writer opens its file in a later second than
    every file already in the folder: when one was opened in the current second (an attempt
    that died at once, a test), it waits for the next."""
    folder = Path(folder)
    last = _last_second(folder) if folder.is_dir() else -1
    while int(time.time()) <= last:
        time.sleep(last + 1 - time.time() + 1e-3)
    return _writer_class()(str(folder), purge_step=purge_step)


class EpochBoard:
    """The epoch metrics of one run as TensorBoard scalars, its HParams session, and the step
    losses of its first epoch (written by its RunRecord and its training loop)."""

    def __init__(self, root: str | Path, cfg: RunConfig, start_epoch: int):
        folder = event_dir(root, cfg)
        self.writer = summary_writer(folder, start_epoch + 1)
        hparams, group = hparams_of(root, cfg)
        self.writer.file_writer.add_summary(session_start(hparams, group), 0)
        self.writer.flush()
        # the first epoch's steps only while it is trained, from scratch, so every step shows
        # once (a resumed run has finished its first epoch and keeps what that wrote); the
        # writer opens at the first step, so a loop that writes none leaves no folder
        self.folder, self.first_epoch = folder, start_epoch == 0
        self.steps = None

    def add_step(self, step: int, loss: float) -> None:
        """The training loss of optimizer step `step` of the first epoch (a non-finite loss
        too: the curve ends where the run diverged); under data-parallel training, that of
        rank 0's share of the batch (the process that writes)."""
        if not self.first_epoch:
            return
        if self.steps is None:
            self.steps = summary_writer(self.folder / STEPS_DIR, 0)
        self.steps.add_scalar("first_epoch/train_loss", loss, step)

    def add(self, row: dict) -> None:
        """One metrics.jsonl row; flushed at once so a running study shows its last epoch."""
        for key, value in row.items():
            finite = isinstance(value, int | float) and math.isfinite(value)
            if finite and key not in ("epoch", "step"):
                self.writer.add_scalar(f"metrics/{key}", value, row["epoch"])
        self.writer.flush()
        self.first_epoch = False
        if self.steps is not None:
            self.steps.close()
            self.steps = None

    def close(self, status: str | None = None) -> None:
        """Close the writers; `status` (the run's final one) ends its HParams session."""
        if status is not None:
            self.writer.file_writer.add_summary(session_end(status), 0)
        if self.steps is not None:
            self.steps.close()
        self.writer.close()
