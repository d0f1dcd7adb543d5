"""The per-epoch row of metrics.jsonl: one type that both training loops write and the report
reads.

A lone run (bnlab.train.loop) and each run of a pack (bnlab.train.packed) build an `EpochRow`
after every epoch; the run's record stores `row.to_dict()` (the JSON object of one line of
metrics.jsonl); the report and the Python API read lines back with `EpochRow.from_dict`. Files
written before a field existed still read: a field missing from a line is None there (and stays
out of `to_dict`), and keys this version does not know are kept in `extra` (and written back as
they were).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class EpochRow:
    """One finished epoch of one run. Losses are mean cross-entropy in nats over the images,
    accuracies fractions in [0, 1] over the images."""

    epoch: int  # 1-based epoch number
    step: int  # optimizer steps done by the end of the epoch
    lr: float  # learning rate of the epoch's last step
    train_loss: float  # mean over the epoch's training images (as trained: augmented)
    train_acc: float  # top-1 over the epoch's training images
    test_loss: float  # mean over the test split, network in eval mode
    test_acc: float  # top-1 on the test split
    test_acc5: float | None = None  # top-5 on the test split (None in older files)
    val_loss: float | None = None  # on the held-out validation split (val_fraction > 0)
    val_acc: float | None = None  # top-1 on the validation split
    epoch_time: float = 0.0  # seconds: training and evaluation of the epoch (a pack's: shared)
    train_images_per_s: float = 0.0  # images of this run per second of training steps
    packed: int | None = None  # runs in the pack that trained this epoch; None: trained alone
    extra: dict[str, Any] = field(default_factory=dict)  # keys of older or newer files

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of metrics.jsonl: the fields in order, those that are None left
        out, then the extra keys."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra" and getattr(self, f.name) is not None}
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> EpochRow:
        """A row read from metrics.jsonl, of this version or an older one."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        known = {n: row.get(n) for n in names}
        return cls(**known, extra={k: v for k, v in row.items() if k not in known})

    def get(self, name: str) -> Any:
        """A field or an extra key by name (None when absent)."""
        if name in self.extra:
            return self.extra[name]
        return getattr(self, name, None) if name != "extra" else None
