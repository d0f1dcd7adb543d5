"""Every arm of the seed study inside one pack: a Fixup run (its scalar biases and multiplier
one entry per run of the pack), runs with probes (probed on their own network at their probe
steps, bnlab.train.pack_model.MemberProbe), a BN run and a plain no-BN run train as one pack
and end as the same runs trained alone.

Tolerances, as tests/test_packed.py: grouped and plain convolutions are different float32
kernels, so after two short epochs losses agree to 2e-3 and accuracies to one image. Weights
and probe values are compared relative to the size of what they measure (see each assert).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from helpers import QUIET, packed_cfg

from bnlab.config import RunConfig
from bnlab.store import EpochRow, Store
from bnlab.train import train_run
from bnlab.train.packed import can_pack, pack_groups, train_packed

# The probed runs keep a constant lr: ICS compares gradients before and after one update, and
# at the step schedule's lr / 100 that difference shrinks to the size of what a ReLU mask
# flipped by float rounding (~1e-7 apart in the weights) changes, which no tolerance separates
# from a real error.
# The BN run's lr is 0.01. At 0.02-0.05 its trajectory is sensitive to a single ReLU input
# that float rounding puts on the other side of 0 (BN keeps many inputs near 0): on one CPU,
# 8 steps then left a BN bias 0.3-3% apart between the pack and the lone run, and at 0.05 the
# network in eval mode gave test losses near 340, 0.6% apart; on another CPU none of it. At
# 0.01 the pack and the lone run agree to 3e-6 relative on seeds 1, 3 and 5 (at 0.005 too).
ARMS = [packed_cfg(seed=0, norm="none", init="fixup", probe_every=3, schedule="constant"),
        packed_cfg(seed=1, norm="bn", probe_every=2, weight_decay=5e-4, schedule="constant",
                   lr=0.01),
        packed_cfg(seed=2, norm="none", lr=0.005, warmup_epochs=1)]  # no BN, He init, warm-up


def test_the_seed_studys_arms_form_one_pack():
    assert can_pack(ARMS) is None
    assert [len(g) for g in pack_groups(ARMS)] == [3]
    many = [dataclasses.replace(c, seed=c.seed + 10 * s) for s in range(7) for c in ARMS]
    assert sorted(len(g) for g in pack_groups(many, max_k=16)) == [10, 11]  # balanced


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    root = tmp_path_factory.mktemp("arms")
    packed = train_packed(ARMS, root / "p", bundle=small, **QUIET)
    lone = [train_run(c, root / "s", bundle=small, **QUIET) for c in ARMS]
    return Store(root / "p"), Store(root / "s"), packed, lone


def test_fixup_and_probed_runs_in_a_pack_end_as_they_do_alone(trained):
    sp, ss, packed, lone = trained
    for c, a, b in zip(ARMS, packed, lone):
        assert a["status"] == b["status"] and a["epochs_done"] == b["epochs_done"] == 2
        ra, rb = sp.run(c.run_id()), ss.run(c.run_id())
        assert sorted(p.name for p in ra.path.iterdir()) == sorted(
            p.name for p in rb.path.iterdir())
        for ma, mb in zip(ra.metrics(), rb.metrics(), strict=True):
            assert ma["packed"] == 3 and "packed" not in mb
            assert ma["step"] == mb["step"] and ma["lr"] == mb["lr"]
            for key in ("train_loss", "test_loss"):
                assert abs(ma[key] - mb[key]) < 2e-3 * max(1.0, abs(mb[key])), (key, c.init)
            assert abs(ma["test_acc"] - mb["test_acc"]) <= 1 / 16 + 1e-9
        wa, wb = ra.load_checkpoint()["model"], rb.load_checkpoint()["model"]
        assert wa.keys() == wb.keys()
        for name, ref in wb.items():
            if ref.is_floating_point():
                # relative to the largest entry of the tensor (a zero-initialized Fixup conv
                # or classifier has entries near 0 that float noise dominates)
                err = float((wa[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                assert err < 1e-3, (c.init, name, err)
        if c.init == "fixup":  # its scalars trained (in the pack, as entries of (K,) vectors)
            assert float(wb["blocks.0.bias1a"].abs()) > 0
            assert abs(float(wa["blocks.0.bias1a"] - wb["blocks.0.bias1a"])) < 1e-3 * max(
                1e-3, float(wb["blocks.0.bias1a"].abs()))


def _probe_table(store: Store, cfg: RunConfig) -> dict[tuple, float]:
    rows = store.run(cfg.run_id()).read_rows("probes.jsonl")
    return {(r["step"], r["epoch"], r["layer"], r["metric"], r.get("unit")): r["value"]
            for r in rows}


def test_probes_inside_a_pack_are_the_lone_runs_probes(trained):
    sp, ss, _, _ = trained
    for c in ARMS[:2]:
        pa, pb = _probe_table(sp, c), _probe_table(ss, c)
        assert pb and pa.keys() == pb.keys()  # the same steps, layers, metrics and units
        steps = sorted({k[0] for k in pb})
        assert steps == list(range(0, 8, c.probe_every))  # 2 epochs of 4 steps
        worst = {}
        for key, vb in pb.items():
            va = pa[key]
            if math.isinf(vb) or math.isnan(vb):
                assert va == vb or (math.isnan(va) and math.isnan(vb)), key
                continue
            # the weights of a probe step agree to ~1e-6 relative (above); a probe value
            # agrees as well relative to the scale of its metric on that layer
            worst[key] = abs(va - vb)
        scale: dict[tuple, float] = {}
        for key, vb in pb.items():
            if key in worst:
                m = (key[2], key[3])
                scale[m] = max(scale.get(m, 0.0), abs(vb))
        # a percentile (act_p*, unit_p*) relative to the spread of that layer's activations:
        # a median near 0 moves by the spacing of the values next to it, not by its own size
        for key in worst:
            if key[3].startswith(("act_p", "unit_p")):
                scale[(key[2], key[3])] = max(scale[(key[2], key[3])],
                                              scale.get((key[2], "act_std"), 0.0))
        for key, d in worst.items():
            tol = 1e-5 if key[0] == 0 else 2e-3  # step 0: the same W_0, the same batch
            assert d <= tol * max(scale[(key[2], key[3])], 1e-6), (c.init, key, d)


def test_a_lone_and_a_packed_run_write_rows_of_one_type(trained):
    sp, ss, _, _ = trained
    for c in ARMS:
        for store in (sp, ss):
            for row in store.run(c.run_id()).metrics():
                typed = EpochRow.from_dict(row)
                assert typed.extra == {} and typed.to_dict() == row  # nothing but the type
        lone = ss.run(c.run_id()).metrics()[-1]
        packed = sp.run(c.run_id()).metrics()[-1]
        assert set(packed) == {*lone, "packed"}  # `packed`: the size of its pack


SEED_LIKE = """
name = "seed-like"
description = "the seed study's arms at tiny sizes"
[base]
dataset = "synthetic"
model = "resnet20"
limit_train = 32
limit_test = 16
batch_size = 8
epochs = 1
lr = 0.002              # low enough that no arm diverges in its first steps
device = "cpu"
[grid]
norm = ["bn", "none"]
seed = [0, 1]
[[cases]]
where = { norm = "none" }
grid = { init = ["kaiming", "fixup"] }
[[cases]]
where = { seed = 0 }
set = { probe_every = 3 }
"""


def test_the_study_runner_packs_every_arm_with_pack_cpu(tmp_path):
    """run_study(pack_cpu=True) (`study run --pack-cpu`) takes the GPU path on the CPU: BN,
    no-BN and Fixup runs, probed and not, all train in one pack (rows with `packed`), and the
    probed ones write probes."""
    from bnlab.study.runner import run_study
    from bnlab.study.spec import expand, load_spec

    spec = tmp_path / "spec.toml"
    spec.write_text(SEED_LIKE)
    out = tmp_path / "out"
    counts = run_study(expand(load_spec(str(spec))), out, tty=False, pack_cpu=True)
    assert sum(counts.values()) == 6 and not counts.get("failed")
    store = Store(out)
    runs = [store.run(r["run_id"]) for r in store.rows()]
    assert len(runs) == 6
    for run in runs:
        rows = run.metrics()
        assert rows and all(r["packed"] == 6 for r in rows), run.run_id
        probed = run.config["probe_every"] == 3
        assert bool(run.read_rows("probes.jsonl")) == probed, run.run_id
    assert {run.config["init"] for run in runs} == {"kaiming", "fixup"}
