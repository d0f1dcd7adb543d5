"""Packing judged by names (build=False, torch-free: the estimates of `bnlab study list`) must
split every built-in study as building the networks does (what the runner trains), and
`bnlab study list` must not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bnlab.config import RunConfig
from bnlab.study.spec import builtin_names, expand, load_spec
from bnlab.train.packing import can_pack, pack_groups


def _ids(groups):
    return [[c.run_id() for c in g] for g in groups]


@pytest.mark.parametrize("name", builtin_names())
def test_names_split_a_builtin_study_as_built_networks_do(name):
    cfgs = [r.cfg for r in expand(load_spec(name)).all_runs]
    by_names = pack_groups(cfgs, 16, build=False)
    built = pack_groups(cfgs, 16, build=True)
    assert _ids(by_names) == _ids(built)


def test_names_and_networks_agree_on_mixed_and_refused_packs():
    base = RunConfig(dataset="cifar10", model="resnet20", epochs=1)
    mixed = [base, base.__class__(**{**base.to_dict(), "norm": "none", "init": "fixup"}),
             base.__class__(**{**base.to_dict(), "norm": "none", "seed": 1})]
    assert can_pack(mixed) is None and can_pack(mixed, build=False) is None
    ghost = [base, base.__class__(**{**base.to_dict(), "norm": "ghost"})]
    assert can_pack(ghost) is not None and can_pack(ghost, build=False) is not None
    torchvision = [base.__class__(**{**base.to_dict(), "model": "resnet18", "seed": s})
                   for s in (0, 1)]
    assert can_pack(torchvision) is not None and can_pack(torchvision, build=False) is not None


def test_study_list_does_not_import_torch():
    code = ("import sys\nfrom bnlab.cli import main\nrc = main(['study', 'list'])\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "quick" in done.stdout and "cifar10-cpu" in done.stdout
