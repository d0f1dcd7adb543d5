"""The checks of a Plan just before it runs: names that nothing knows, refused before anything
is trained.

The registries import torch: this module is loaded by the API when a study is about to run, so
that reading and expanding specs (spec.py, expand.py) stays free of torch's start-up time.
"""

from __future__ import annotations

from pathlib import Path

from bnlab.data import DATASETS
from bnlab.errors import UserError, suggest, unknown
from bnlab.models import MODELS
from bnlab.models.entry import check_entry
from bnlab.models.init import INITS
from bnlab.norm import FORMULAS
from bnlab.runtime import resolve_device
from bnlab.study.expand import Plan
from bnlab.train.board import require_tensorboard
from bnlab.usercode import ENTRY


def known_datasets() -> tuple[str, ...]:
    """The dataset registry's plain names; its pattern imagefolder:PATH is checked by its path."""
    return tuple(name for name in DATASETS if ":" not in name)


def _registries() -> dict[str, dict]:
    """The name registries of the model, norm and init factories."""
    return {"model": MODELS, "norm": FORMULAS, "init": INITS}


def preflight(plan: Plan) -> None:
    """Refuse, before anything is trained, names that nothing knows: unmapped placeholder
    datasets, image folders that do not exist, models, norms and inits missing from their
    registries (and for an entry: model, its module and function), an unavailable device,
    TensorBoard output without the tensorboard package.

    Only names are checked: a combination a factory refuses (say, options of one norm) is a run
    that fails at run time, recorded as failed while the rest of the study goes on.
    """
    known = known_datasets()
    for r in plan.all_runs:
        ds = r.cfg.dataset
        if ds not in known and not ds.startswith("imagefolder:"):
            raise UserError(f"dataset {ds!r} of study {plan.spec.name!r} is not a dataset "
                            f"name{suggest(ds, known)}: map it with --data-map "
                            f"{ds}=imagefolder:PATH (or one of {', '.join(known)})")
    for ds in dict.fromkeys(r.cfg.dataset for r in plan.all_runs):
        path = ds.removeprefix("imagefolder:")
        if ds.startswith("imagefolder:") and not Path(path).expanduser().exists():
            raise UserError(f"image folder {path!r} of study {plan.spec.name!r} does not "
                            "exist: give --data-map NAME=imagefolder:PATH a folder in the "
                            "ImageNet layout (train/, val/ or test/) or a .tar/.tar.gz of one")
    for kind, names in _registries().items():
        for value in dict.fromkeys(getattr(r.cfg, kind) for r in plan.all_runs):
            if value not in names:
                raise unknown(kind, value, names)
            if kind == "model" and value.startswith(ENTRY):
                check_entry(value)  # its module and function, before anything trains
    for device in sorted({r.cfg.device for r in plan.all_runs}):
        resolve_device(device)
    if any(r.cfg.tensorboard for r in plan.all_runs):
        require_tensorboard()
