"""TensorBoard event files of a run (run option `tensorboard`), so that `tensorboard --logdir OUT`
shows every run of an output folder, while they train:

    OUT/tensorboard/<name>/          the epoch metrics of metrics.jsonl as scalars, at step =
                                     epoch (tags metrics/test_acc, metrics/train_loss, ...)
    OUT/tensorboard/<name>/probes/   with probe_every > 0: every probe as a scalar and each
                                     recorded activation as a histogram, at step = optimizer step
                                     (tags <metric>/<layer>, act/<layer>)

<name> is the run id; for a run of a study (listed in OUT/study.json) it is its arm and seed,
e.g. `norm=bn,lr=0.1/seed0`: the values of the study's varying axes other than seed, then the
seed. A run purges what a killed attempt wrote after its last checkpoint (everything, when it
starts from scratch), so every step shows once. Writers are the optional tensorboard
package's (the `tensorboard` extra).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from bnlab.config import RunConfig
from bnlab.errors import UserError
from bnlab.numbers import fmt_value

BOARD_DIR = "tensorboard"
NOT_IN_NAME = ("seed",)  # the seed is the name's last part; every other varying axis names the arm


def _text(v) -> str:
    """A value in a run's folder name: fmt_value's text, a dict as compact JSON (no spaces)."""
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return fmt_value(v)


def run_name(root: str | Path, cfg: RunConfig) -> str:
    """The run's folder name under OUT/tensorboard (see the module docstring)."""
    study = Path(root) / "study.json"
    meta = json.loads(study.read_text()) if study.is_file() else {}
    runs = {r.get("run_id"): r.get("values") or {} for r in meta.get("runs") or []}
    run_id = cfg.run_id()
    if run_id not in runs:
        return run_id
    values = runs[run_id]
    arm = ",".join(f"{a}={_text(values.get(a))}" for a in meta.get("axes") or []
                   if a not in NOT_IN_NAME)
    # one path component per part: a value holding a slash must not open a folder
    arm = re.sub(r"[/\\]", "_", arm) or "all"
    return f"{arm}/seed{_text(values.get('seed', cfg.seed))}"


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


def summary_writer(folder: Path, purge_step: int | None = None):
    """A SummaryWriter into `folder`; events at steps >= purge_step from an earlier attempt are
    hidden (None: nothing hidden, for writers of their own folder only). A run passes its start
    step even when it starts from scratch: an attempt killed before its first checkpoint
    has written events already."""
    return _writer_class()(str(folder), purge_step=purge_step)


class EpochBoard:
    """The epoch metrics of one run as TensorBoard scalars (written by its RunRecord)."""

    def __init__(self, root: str | Path, cfg: RunConfig, start_epoch: int):
        self.writer = summary_writer(event_dir(root, cfg), start_epoch + 1)

    def add(self, row: dict) -> None:
        """One metrics.jsonl row; flushed at once so a running study shows its last epoch."""
        for key, value in row.items():
            finite = isinstance(value, int | float) and math.isfinite(value)
            if finite and key not in ("epoch", "step"):
                self.writer.add_scalar(f"metrics/{key}", value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
