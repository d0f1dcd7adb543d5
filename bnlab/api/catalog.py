"""The built-in studies with their sizes and estimated times (`bnlab study list`), read
without torch: specs, their expansion and the estimate import none of it."""

from __future__ import annotations

from bnlab.api import checks
from bnlab.api.frames import frame
from bnlab.study import spec as specs
from bnlab.study import status as statuses


def list_studies(*, text: bool = False):
    """`bnlab study list`: the built-in studies with their runs and estimated minutes (a
    DataFrame; text=True: the lines the command prints)."""
    if checks.flag("text", text):
        return statuses.list_text()
    rows = []
    for name in specs.builtin_names():
        sp = specs.load_spec(name)
        rows.append({"study": name, "runs": len(specs.expand(sp).runs),
                     "cpu_minutes": sp.estimate.get("cpu_minutes"),
                     "gpu_minutes": sp.estimate.get("gpu_minutes"),
                     "description": sp.description})
    return frame(rows)
