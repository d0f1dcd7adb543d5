"""What bnlab offers (`bnlab datasets`, `models`, `norms`) and its speed (`bnlab bench`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bnlab import bench
from bnlab.api import checks
from bnlab.api.frames import frame
from bnlab.bench import BenchArgs, check_args
from bnlab.data import DATASETS
from bnlab.errors import UserError
from bnlab.models import MODELS, family_lines
from bnlab.norm import FORMULAS, OPTIONS
from bnlab.norm.table import TABLE_SHAPE, TABLE_STEPS, format_stats_table, forward_stats


def list_datasets() -> dict[str, str]:
    """`bnlab datasets`: {dataset name: what it is}."""
    return dict(DATASETS)


def list_models() -> dict[str, str]:
    """`bnlab models`: {model name: what it is}; torchvision:NAME families: model_families()."""
    return dict(MODELS)


def model_families() -> list[tuple[str, str]]:
    """The torchvision:NAME families, (family, what bnlab does with its norms)."""
    return list(family_lines())


def list_norms() -> dict[str, tuple[str, dict[str, Any]]]:
    """`bnlab norms`: {norm name: (its formula, {option: default})}."""
    return {name: (text, dict(OPTIONS[name])) for name, text in FORMULAS.items()}


def norm_output_table() -> str:
    """`bnlab norms --table`: each norm's per-channel output mean and std on one fixed batch
    in training and eval mode, measured now, with the sentence that says how."""
    return (f"Per-channel mean and std of each norm's output on one fixed batch of shape "
            f"{TABLE_SHAPE} (channel c: mean 2c, std c+1); train = first training-mode pass, "
            f"eval = after {TABLE_STEPS} training-mode passes; default options.\n\n"
            + format_stats_table(forward_stats()))


def bench_speed(variants: Iterable[str] = ("textbook", "eager", "compiled", "packed"),
                precisions: Iterable[str] = ("fp32",), timeout: float = 1800,
                out: str | Path | None = None, log: Callable[[str], None] = print,
                records: bool = False, **options: Any):
    """`bnlab bench`: images/s of each variant, one row each (`log` gets each row's JSON line
    as it is measured); `options` are BenchArgs fields (data, model, batch_size, steps, k,
    device, workers, ...). records=True: the list of dicts (a row with "error" failed)."""
    variants = checks.strings("variants", list(variants) if isinstance(variants, tuple)
                              else variants, optional=False)
    precisions = checks.strings("precisions", list(precisions) if isinstance(precisions, tuple)
                                else precisions, optional=False)
    timeout = checks.number("timeout", timeout, 0)
    out = checks.folder("out", out, optional=True)
    records = checks.flag("records", records)
    if not callable(log):
        raise UserError(f"log must be a function of one string, got {checks.shown(log)}")
    fields = {f.name: f for f in dataclasses.fields(BenchArgs)}
    for k, v in options.items():
        if k not in fields:
            raise UserError(f"unknown bench option {k!r}; accepted: {', '.join(sorted(fields))}")
        kind = type(fields[k].default)
        if kind is bool:
            checks.flag(k, v)
        elif kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise UserError(f"{k} must be an integer, got {checks.shown(v)}")
        elif not isinstance(v, kind):
            raise UserError(f"{k} must be a string, got {checks.shown(v)}")
    a = BenchArgs(**options)
    check_args(a, variants, precisions, timeout)
    rows = bench.run_all(a, variants, precisions, timeout, log, str(out) if out else None)
    return rows if records else frame(rows)
