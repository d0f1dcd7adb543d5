"""Tuning one value of an arm on one seed at a short budget, then running the choice for every
seed: the protocol a study's [tune] section writes down (docs/studies.md, "A fair chance for
every arm").

A tuned run of the grid (one per seed, per dataset, per value of the other axes) belongs to a
*group*: the runs that are equal but for their seed and the tuned axis. A group's tuning runs
are its run at seed `Tune.seed`, once per value of `Tune.values`, with `Tune.set` applied (what
makes them short, e.g. fewer epochs). When every tuning run of a group has ended, the value with
the highest final validation accuracy among the runs that finished training (completed or
no_learning; a diverged or failed run is never chosen) is written into every run of the group,
which then trains at the full budget like any other run. The choice reads the validation split
only (the runs need val_fraction > 0), so the tuned arm's test accuracy is not biased by it.
Ties go to the value listed first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from bnlab.config import NOT_ARM_KEYS, RunConfig
from bnlab.store import FINISHED, Store

TUNE_KEYS = ("where", "axis", "values", "seed", "set")
CHOOSABLE = ("completed", "no_learning")  # statuses whose final validation accuracy is a result


@dataclass(frozen=True)
class Tune:
    where: dict[str, Any]  # the runs whose value is tuned
    axis: str  # the field tuned, e.g. "lr"
    values: tuple  # the values tried, in the spec's order
    seed: int  # the seed of every tuning run
    set: dict[str, Any]  # what makes a tuning run short, e.g. {"epochs": 2}

    def describe(self) -> str:
        short = ", ".join(f"{k} {v}" for k, v in self.set.items())
        return (f"{self.axis} tuned on seed {self.seed}" + (f" ({short})" if short else "")
                + f" from {', '.join(str(v) for v in self.values)}, on validation accuracy")


def group_key(cfg: RunConfig, tune: Tune) -> str:
    """The group of a tuned run: a hash of every field that makes an arm (config.NOT_ARM_KEYS:
    the seed, probes and execution options do not) but the tuned axis."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in NOT_ARM_KEYS and k != tune.axis}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def tuning_configs(cfg: RunConfig, tune: Tune) -> list[RunConfig]:
    """The tuning runs of the group of `cfg`, one per value, in the spec's order: without the
    probes of `cfg` (a tuning run is read for its validation accuracy alone) unless `set`
    asks for them."""
    return [dataclasses.replace(cfg, seed=tune.seed, probe_every=0,
                                **{tune.axis: v, **tune.set}) for v in tune.values]


@dataclass
class Choice:
    """The outcome of one group's tuning runs."""

    group: str
    value: Any | None  # the chosen value; None while tuning runs are unfinished, or none could be
    ended: bool  # every tuning run has a final status (a result, or failed)
    trials: list[dict]  # per value: run_id, value, status, val_acc
    edge: str | None = None  # "lowest" / "highest" when a numeric choice is an end of the values

    @property
    def impossible(self) -> bool:
        """Every tuning run ended and none finished training: nothing to choose."""
        return self.ended and self.value is None


def choose(store: Store, group: str, cfgs: list[RunConfig], tune: Tune) -> Choice:
    """The choice of one group from its tuning runs' stored summaries."""
    trials, ended = [], True
    for cfg in cfgs:
        s = store.run(cfg.run_id()).summary or {}
        status = s.get("status", "pending")
        ended = ended and (status in FINISHED or status == "failed")
        val = s.get("val_acc")
        trials.append({"run_id": cfg.run_id(), "value": getattr(cfg, tune.axis),
                       "status": status,
                       "val_acc": float(val) if isinstance(val, int | float) else None})
    ok = [t for t in trials if t["status"] in CHOOSABLE and t["val_acc"] is not None]
    if not ended or not ok:
        return Choice(group, None, ended, trials)
    best = max(ok, key=lambda t: t["val_acc"])  # max keeps the first of equal ones
    edge = None
    nums = [v for v in tune.values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(nums) == len(tune.values) and len(nums) > 1:
        if best["value"] == min(nums):
            edge = "lowest"
        elif best["value"] == max(nums):
            edge = "highest"
    return Choice(group, best["value"], True, trials, edge)


def with_known_choices(plan, out) -> Any:
    """`plan` (bnlab.study.expand.Plan) with the value each group's ended tuning runs in the
    folder `out` choose, read without writing anything: the tuned runs of a study whose tuning
    is done, under the ids they train with (for the estimate before a study resumes, and
    `study list`). Groups without a choice keep waiting; no folder, the plan as it is."""
    from pathlib import Path

    if not plan.groups or out is None or not Path(out).is_dir():
        return plan
    store = Store(out, readonly=True)
    chosen = {}
    for g in plan.groups:
        c = choose(store, g.key, [r.cfg for r in g.tuning], plan.spec.tune)
        if c.value is not None:
            chosen[g.key] = c.value
    return plan.with_choices(chosen) if chosen else plan
