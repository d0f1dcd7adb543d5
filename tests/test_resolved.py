"""What a run or study resolved, said out loud: a torchvision norm swap logged once and its
resolved group counts kept in config.json, a prediction comparison with one arm skipped with a
word in the log and the report, a repeated seed of a grid warned about, and a run whose test
loss is non-finite recorded as diverged (not as no_learning)."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torchvision
from torch import nn

from bnlab import cli
from bnlab.config import from_mapping
from bnlab.store import EpochRow, Store
from bnlab.study.spec import expand, parse_spec
from bnlab.train import train_run
from bnlab.train.record import RunRecord

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn_count(name: str) -> int:
    """BatchNorm2d layers of torchvision's own model, counted here."""
    net = torchvision.models.get_model(name, weights=None, num_classes=10)
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


@pytest.mark.parametrize("options, groups, rule", [({}, 8, False), ({"groups": 5}, 1, True)])
def test_a_torchvision_swap_is_logged_once_and_recorded(tmp_path, options, groups, rule):
    cfg = from_mapping(dict(dataset="synthetic", model="torchvision:resnet18", norm="group",
                            norm_options=options, limit_train=16, limit_test=8, batch_size=8,
                            epochs=1, device="cpu", augment=False))
    lines = []
    train_run(cfg, tmp_path, log=lines.append)
    n = _bn_count("resnet18")
    swap = [x for x in lines if "BatchNorm2d ->" in x]
    assert swap[0].startswith(f"torchvision:resnet18: {n} BatchNorm2d -> GroupNorm({groups}) x {n}")
    assert len(swap) == 1
    # 5 groups divide none of resnet18's 64..512 channels: gcd(5, C) = 1, and the line says why
    assert ("gcd(5, its channels)" in swap[0]) is rule
    record = json.loads((Store(tmp_path).run(cfg.run_id()).path / "config.json").read_text())
    assert record["model"]["norm_layers"] == {f"GroupNorm({groups})": n}


def test_own_models_state_the_group_rule_only_when_it_changed_a_count(tmp_path):
    lines = []
    for groups in (4, 6):  # resnet20's 16/32/64 channels: 4 divides them, 6 does not (gcd 2)
        cfg = from_mapping(dict(dataset="synthetic", model="resnet20", norm="group",
                                norm_options={"groups": groups}, limit_train=8, limit_test=8,
                                batch_size=8, epochs=1, device="cpu"))
        train_run(cfg, tmp_path, log=lines.append)
        record = json.loads((Store(tmp_path).run(cfg.run_id()).path / "config.json")
                            .read_text())
        assert record["model"]["norm_layers"] == {f"GroupNorm({math.gcd(groups, 16)})": 19}
    rules = [x for x in lines if "gcd(" in x]
    assert len(rules) == 1 and rules[0].startswith("norm group: GroupNorm(2) x 19 (groups 6")


TINY = """
name = "tiny"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 64
limit_test = 64
batch_size = 32
epochs = 1
device = "cpu"
[grid]
norm = ["bn", "none"]
seed = [0, 1]
[analysis]
compare = true
"""


def test_compare_with_one_finished_arm_is_skipped_with_a_word(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(TINY))
    out = tmp_path / "out"
    assert cli.main(["study", "run", str(spec), "--out", str(out), "--only", "norm=bn"]) == 0
    said = ("the prediction comparison (analysis.compare) was skipped on synthetic: 1 of its "
            "1 arm has a finished run, and comparing predictions needs two")
    assert said[0].upper() + said[1:] in capsys.readouterr().out
    assert not (out / "analysis").exists()
    assert cli.main(["study", "report", str(out)]) == 0
    report = (out / "report" / "report.md").read_text()
    assert said[0].upper() + said[1:] in " ".join(report.split())


def test_a_repeated_seed_is_warned_about(capsys):
    spec = parse_spec({"name": "dup", "base": {"dataset": "synthetic"},
                       "grid": {"norm": ["bn", "none"], "seed": [0, 1, 0]}})
    plan = expand(spec)
    assert len(plan.runs) == 4  # each (norm, seed) once
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "study 'dup': 2 grid points repeat a run" in err
    assert "(norm='bn', seed=0) is listed more than once" in err
    parse_and_expand = expand(parse_spec({"name": "ok", "base": {"dataset": "synthetic"},
                                          "grid": {"seed": [0, 1]}}))
    assert len(parse_and_expand.runs) == 2 and capsys.readouterr().err == ""


@pytest.mark.parametrize("test_loss, status", [(math.nan, "diverged"), (math.inf, "diverged"),
                                               (2.31, "no_learning")])
def test_a_non_finite_test_loss_is_divergence(tmp_path, test_loss, status):
    """A train loss of 3e10 is finite, so training does not stop; the test loss that follows
    is NaN and the accuracy at chance: diverged. At chance with a finite loss: no_learning."""
    cfg = from_mapping(dict(dataset="synthetic", epochs=1))
    rec = RunRecord(Store(tmp_path), cfg)
    rec.begin({"config": cfg.to_dict()})
    rec.add_epoch(EpochRow(epoch=1, step=10, lr=0.1, train_loss=3e10, train_acc=0.1,
                           test_loss=test_loss, test_acc=0.1, epoch_time=1.0), chance=0.13)
    summary = rec.finish(chance=0.13)
    assert summary["status"] == status
    assert ("test_loss_nonfinite_epoch" in summary) is (status == "diverged")
    assert Store(tmp_path).run(cfg.run_id()).summary["status"] == status
