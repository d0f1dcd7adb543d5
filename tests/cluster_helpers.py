"""Imported by submitit's job processes in tests/test_cluster.py (tests/ is on their path)."""

from __future__ import annotations

from pathlib import Path

from bnlab.config import RunConfig
from bnlab.train import train_run


def run_one(cfg: RunConfig, out: Path, log=print) -> dict:
    """Train or resume one run (what bnlab.study.run_one does, without its lock)."""
    return train_run(cfg, out, resume=True, log=log)
