"""Published reference numbers beside a study's own: a small TOML file, one entry per number.

    [[reference]]
    where = { dataset = "cifar10", norm = "bn" }  # the arm it belongs to: its values
    metric = "test_acc"                          # the only metric compared: final test accuracy
    value = 0.9125                               # a fraction (1 - 8.75% error)
    source = "He et al. 2016, Deep Residual Learning for Image Recognition"
    location = "Table 6: ResNet-20, 8.75% test error"
    setting = "lossless CIFAR-10, 164 epochs"    # optional: how it differs from this study

The built-in studies ship their file (bnlab/studies/references/<study>.toml); `bnlab study
report --references FILE` uses another. An entry belongs to an arm when every key of `where`
equals the arm's value (`dataset` compares with the study's dataset name); entries that match
no arm are listed in the notes as unmatched, never silently dropped.

A `where` key may also be one the runs measured rather than an option (DERIVED):

    per_device_batch   images per device and step: the global batch_size over the processes
                       of a data-parallel run, as its config.json's `distributed` record says
                       (a run without that record trained on one device: its batch_size)

A paper's "images per GPU" is this, not the global batch: a study's batch_size = 16 is 2 per
GPU on 8 GPUs but 16 on one device. An arm has a derived value when every run of it with a
stored config has the same one; an arm whose runs differ, or that has none yet, matches no
entry that names the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from bnlab.errors import UserError
from bnlab.report.load import Run, same

METRICS = ("test_acc",)
KEYS = ("where", "metric", "value", "source", "location", "setting")


@dataclass(frozen=True)
class Reference:
    where: dict[str, Any]
    metric: str
    value: float
    source: str
    location: str
    setting: str = ""

    @property
    def citation(self) -> str:
        text = f"{self.source}, {self.location}"
        return text + (f" ({self.setting})" if self.setting else "")


def builtin_path(study_name: str) -> Path | None:
    """The reference file shipped for a built-in study, or None."""
    p = resources.files("bnlab") / "studies" / "references" / f"{study_name}.toml"
    return Path(str(p)) if p.is_file() else None


def load_references(path: str | Path) -> list[Reference]:
    """Every [[reference]] of a TOML file, checked; a mistake is one line naming the file."""
    p = Path(path)
    where = f"reference file {str(p)!r}"
    if not p.is_file():
        raise UserError(f"{where} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{where} is not valid TOML: {e}") from None
    entries = data.get("reference", [])
    if set(data) - {"reference"} or not isinstance(entries, list):
        raise UserError(f"{where} must hold [[reference]] tables only, got keys "
                        f"{', '.join(sorted(data))}")
    out = []
    for i, e in enumerate(entries, 1):
        at = f"{where}, reference {i}"
        if not isinstance(e, dict):
            raise UserError(f"{at} must be a table")
        unknown = sorted(set(e) - set(KEYS))
        if unknown:
            raise UserError(f"{at}: unknown key {unknown[0]!r}; accepted: {', '.join(KEYS)}")
        missing = [k for k in KEYS[:-1] if k not in e]
        if missing:
            raise UserError(f"{at} lacks {missing[0]!r}")
        if not isinstance(e["where"], dict) or not e["where"]:
            raise UserError(f"{at}: where must be a non-empty table of arm values")
        if e["metric"] not in METRICS:
            raise UserError(f"{at}: metric {e['metric']!r} is not accepted; accepted: "
                            f"{', '.join(METRICS)}")
        v = e["value"]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise UserError(f"{at}: value must be a fraction in [0, 1], got {v!r}")
        for k in ("source", "location", "setting"):
            if not isinstance(e.get(k, ""), str):
                raise UserError(f"{at}: {k} must be a string")
        out.append(Reference(dict(e["where"]), e["metric"], float(v), e["source"],
                             e["location"], e.get("setting", "")))
    return out


def per_device_batch(run: Run) -> int | None:
    """The images of one device's step in `run` (DERIVED); None without a stored config."""
    if run.config is None:
        return None
    recorded = (run.distributed or {}).get("per_device_batch")
    return recorded if isinstance(recorded, int) else run.config.get("batch_size")


DERIVED = {"per_device_batch": per_device_batch}


def arm_value(key: str, value, runs: list[Run]):
    """An arm's value of a `where` key: value(key), its axis or config value, or for a DERIVED
    key the one value its runs with a stored config share (None where they differ or none has
    one)."""
    if key not in DERIVED:
        return value(key)
    seen = {DERIVED[key](r) for r in runs if r.config is not None}
    return seen.pop() if len(seen) == 1 else None


def matches(ref: Reference, dataset: str, value) -> bool:
    """Whether `ref` belongs to an arm on `dataset` whose value of a key is value(key)."""
    for k, v in ref.where.items():
        if k == "dataset":
            if str(v) != dataset:
                return False
        elif not same(value(k), v):
            return False
    return True
