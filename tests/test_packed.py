"""Packed runs against the same runs trained one by one.

Tolerances: in float64 a packed step and K lone steps agree to 1e-10 relative (the arithmetic is
the same up to reassociation, whose error there is ~1e-15 per operation, grown by a few training
steps). In float32 grouped and plain convolutions round differently (different oneDNN kernels);
training amplifies those ~1e-7 relative differences, so after 2 short epochs the metrics agree to
2e-3 absolute on losses and to one test image on accuracies.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import QUIET, packed_cfg, step_packed_and_lone

from bnlab.data.bundle import hold_out
from bnlab.data.loader import make_loader
from bnlab.errors import DataMismatch, UserError
from bnlab.models import build_for
from bnlab.models.grouped import (
    NotPackable,
    check_packable,
    owned_entries,
    pack_models,
    unpack_state,
)
from bnlab.store import FINISHED, Store
from bnlab.train import train_run
from bnlab.train.evaluate import evaluate_topk
from bnlab.train.optim import PackedSGD
from bnlab.train.packed import can_pack, pack_groups, train_packed


@pytest.mark.parametrize("model,norms", [("resnet20", "bn"), ("resnet20", "none"),
                                         ("mlp3x100", "bn"), ("resnet20", "bn,none,bn"),
                                         ("mlp3x100", "none,bn,none")])
def test_packed_steps_equal_lone_steps_float64(small, model, norms):
    """K packed steps against K lone steps; 'bn,none,bn': runs with and without BN in one
    pack, whose entries a run does not own must not move."""
    norm = (norms.split(",") * 3)[:3]
    cfgs = [packed_cfg(model=model, norm=norm[0], seed=0),
            packed_cfg(model=model, norm=norm[1], seed=1, lr=0.02, weight_decay=5e-4, momentum=0.8),
            packed_cfg(model=model, norm=norm[2], seed=2, decay_norm_and_bias=True, nesterov=False)]
    assert can_pack(cfgs) is None
    models = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        models.append(build_for(c, small).double())
    packed = pack_models(models)
    owned = owned_entries(models, packed)
    frozen = {n: p.detach().clone() for n, p in packed.named_parameters()
              if not all(owned[n])}
    assert bool(frozen) == (len(set(norm)) > 1)
    k = len(cfgs)
    step_packed_and_lone(packed, models, cfgs, owned, steps=3, batch=6, size=8)
    state = packed.state_dict()
    for name, before in frozen.items():
        rows = state[name].reshape(k, -1)
        for i in range(k):
            if not owned[name][i]:
                assert torch.equal(rows[i], before.reshape(k, -1)[i]), (name, i)
            else:
                assert not torch.equal(rows[i], before.reshape(k, -1)[i]), (name, i)
    for i, m in enumerate(models):
        mine = unpack_state(state, i, k, m.state_dict())
        for name, ref in m.state_dict().items():
            if ref.is_floating_point():
                err = float((mine[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                assert err < 1e-10, (name, err)
            else:
                assert torch.equal(mine[name], ref), name


@torch.no_grad()
def _loop_sgd_step(params, bufs, wd_rows, mom_rows, lr_rows, nesterov):
    """A per-parameter loop of the packed SGD formula (the second implementation)."""
    for name, p in params.items():
        if p.grad is None:
            continue
        d = p.grad if wd_rows[name] is None else p.grad + wd_rows[name] * p
        bufs[name].mul_(mom_rows[name]).add_(d)
        upd = d + mom_rows[name] * bufs[name] if nesterov else bufs[name]
        p.sub_(lr_rows[name] * upd)


@pytest.mark.parametrize("nesterov", [True, False])
def test_flat_packed_sgd_equals_a_loop_over_parameters_bit_for_bit(small, nesterov):
    """The flat optimizer against a loop over the parameters in float32, channels_last
    weights, grads in other strides than their parameters, and a parameter without a grad."""
    cfgs = [packed_cfg(seed=0, nesterov=nesterov, weight_decay=5e-4),
            packed_cfg(seed=1, nesterov=nesterov, lr=0.02, weight_decay=1e-3, momentum=0.8),
            packed_cfg(seed=2, nesterov=nesterov, decay_norm_and_bias=True, weight_decay=2e-4)]
    models = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        models.append(build_for(c, small))
    ndim = {n: p.ndim for n, p in models[0].named_parameters()}
    a = pack_models(models).to(memory_format=torch.channels_last)
    b = pack_models(models).to(memory_format=torch.channels_last)
    opt = PackedSGD(a, cfgs, ndim)
    k = len(cfgs)
    params = dict(b.named_parameters())
    bufs = {n: torch.zeros_like(p) for n, p in params.items()}

    def rows(values, p):
        t = torch.tensor(values, dtype=torch.float64).to(p.dtype)
        return t[:, None].expand(k, p.shape[0] // k).reshape(-1).view(-1, *[1] * (p.ndim - 1))

    wd_rows = {n: rows([c.weight_decay if ndim[n] > 1 or c.decay_norm_and_bias else 0.0
                        for c in cfgs], p) for n, p in params.items()}
    mom_rows = {n: rows([c.momentum for c in cfgs], p) for n, p in params.items()}
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        lr = torch.tensor([c.lr * (0.5 ** step) for c in cfgs], dtype=torch.float64)
        for (name, pa), pb in zip(a.named_parameters(), params.values()):
            if step == 2 and name.endswith("fc.bias"):
                pa.grad = pb.grad = None
                continue
            grad = torch.randn(pa.shape, generator=g)  # contiguous, whatever pa's layout
            pa.grad, pb.grad = grad.clone(), grad.clone()
        opt.step(lr)
        _loop_sgd_step(params, bufs, wd_rows, mom_rows,
                       {n: rows(lr.tolist(), p) for n, p in params.items()}, nesterov)
    for name, pb in params.items():
        pa = dict(a.named_parameters())[name]
        assert pa.stride() == pb.stride(), name
        assert torch.equal(pa, pb), name
        assert torch.equal(opt.bufs[name], bufs[name]), name


def test_flat_packed_sgd_keeps_the_model_training(small):
    """The parameters become views of the optimizer's flat tensor: the model still computes
    with them, autograd still fills their grads, and updates reach the model."""
    cfgs = [packed_cfg(seed=0), packed_cfg(seed=1)]
    models = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        models.append(build_for(c, small))
    packed = pack_models(models)
    opt = PackedSGD(packed, cfgs, {n: p.ndim for n, p in models[0].named_parameters()})
    before = {n: p.detach().clone() for n, p in packed.named_parameters()}
    x = torch.randn(4, 6, 8, 8)
    packed(x).square().mean().backward()
    opt.step(torch.tensor([0.1, 0.1]))
    for name, p in packed.named_parameters():
        assert p.untyped_storage().data_ptr() == opt.flat.untyped_storage().data_ptr()
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p, before[name]), name


@pytest.mark.parametrize("norms", ["bn,bn,bn", "none,bn,none"])
def test_train_packed_matches_lone_runs(small, tmp_path, norms):
    n = norms.split(",")
    scale = [0.1 if x == "none" else 1.0 for x in n]  # He-initialized ResNet-20 without BN
    cfgs = [packed_cfg(seed=0, norm=n[0], lr=0.05 * scale[0]),  # diverges at lr 0.05
            packed_cfg(seed=1, lr=0.02 * scale[1], weight_decay=5e-4, norm=n[1]),
            packed_cfg(seed=2, momentum=0.8, schedule="cosine", norm=n[2], lr=0.05 * scale[2])]
    assert can_pack(cfgs) is None
    packed = train_packed(cfgs, tmp_path / "p", bundle=small, **QUIET)
    lone = [train_run(c, tmp_path / "s", bundle=small, **QUIET) for c in cfgs]
    sp, ss = Store(tmp_path / "p"), Store(tmp_path / "s")
    for c, a, b in zip(cfgs, packed, lone):
        assert a["status"] == b["status"] and a["epochs_done"] == b["epochs_done"] == 2
        ra, rb = sp.run(c.run_id()), ss.run(c.run_id())
        assert sorted(p.name for p in ra.path.iterdir()) == sorted(
            p.name for p in rb.path.iterdir())
        for ma, mb in zip(ra.metrics(), rb.metrics()):
            assert ma["step"] == mb["step"] and ma["lr"] == mb["lr"]
            for key in ("train_loss", "test_loss"):
                assert abs(ma[key] - mb[key]) < 2e-3 * max(1.0, abs(mb[key])), (
                    key, ma[key], mb[key])
            assert abs(ma["train_acc"] - mb["train_acc"]) <= 1 / 32 + 1e-9
            assert abs(ma["test_acc"] - mb["test_acc"]) <= 1 / 16 + 1e-9
        ca, cb = ra.load_checkpoint(), rb.load_checkpoint()
        assert ca.keys() == cb.keys()
        assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"]
        assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()
        assert torch.equal(ca["rng_cpu"], cb["rng_cpu"])
        assert ca["model"].keys() == cb["model"].keys()
        for name, ref in cb["model"].items():
            assert ca["model"][name].shape == ref.shape
        assert ra.config == rb.config
    assert {r["run_id"] for r in sp.rows()} == {c.run_id() for c in cfgs}


def test_packed_runs_evaluate_the_validation_split_as_lone_runs_do(small, tmp_path):
    cfgs = [packed_cfg(seed=s, val_fraction=0.25, epochs=1) for s in (0, 1)]
    train_packed(cfgs, tmp_path / "p", bundle=small, **QUIET)
    for c in cfgs:
        lone = train_run(c, tmp_path / "s", bundle=small, **QUIET)
        packed = Store(tmp_path / "p").run(c.run_id()).summary
        assert abs(packed["val_acc"] - lone["val_acc"]) <= 1 / 8 + 1e-9
        assert abs(packed["val_loss"] - lone["val_loss"]) < 2e-3 * max(1.0, lone["val_loss"])
        config = Store(tmp_path / "p").run(c.run_id()).read_json("config.json")
        held = len(hold_out(small, 0.25).val)  # round(n_c / 4) of each class: 10 of 32
        assert config["data"]["n_val"] == held == 10 and config["data"]["n_train"] == 22


@pytest.mark.parametrize("mixed", [False, True])
def test_packed_resume_alone_and_packed(small, tmp_path, mixed):
    cfgs = [packed_cfg(seed=3),
            packed_cfg(seed=4, norm="none", lr=0.005) if mixed else packed_cfg(seed=4)]
    full = train_packed(cfgs, tmp_path / "full", bundle=small, **QUIET)

    def stop_in_epoch_2(line):
        if "epoch 2/2" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_packed(cfgs, tmp_path / "cut", bundle=small, log=stop_in_epoch_2)
    store = Store(tmp_path / "cut")
    assert all(store.run(c.run_id()).summary["status"] == "running" for c in cfgs)
    # one run resumes alone from its packed checkpoint, the other resumes as a pack of one
    alone = train_run(cfgs[0], tmp_path / "cut", resume=True, bundle=small, **QUIET)
    again = train_packed(cfgs, tmp_path / "cut", bundle=small, **QUIET)
    assert again[0] == alone
    assert again[1]["status"] == full[1]["status"]
    # a pack of one against the pack of two it left: convolutions of another group count are
    # other kernels, which round apart (weights ~1e-6 apart after one epoch without conv
    # biases; with them, bias gradients are also summed in another order)
    assert abs(again[1]["test_loss"] - full[1]["test_loss"]) < 2e-3
    assert again[1]["epochs_done"] == full[1]["epochs_done"] == 2
    assert abs(alone["test_loss"] - full[0]["test_loss"]) < 2e-3


@pytest.mark.parametrize("other", ["none", "bn"])
def test_one_diverging_run_stops_alone(small, tmp_path, other):
    cfgs = [packed_cfg(seed=0, norm="none", lr=10.0, momentum=0.0),
            packed_cfg(seed=1, norm=other, lr=0.02)]
    packed = train_packed(cfgs, tmp_path / "p", bundle=small, **QUIET)
    lone = [train_run(c, tmp_path / "s", bundle=small, **QUIET) for c in cfgs]
    assert lone[0]["status"] == packed[0]["status"] == "diverged"
    assert packed[0]["diverged_step"] == lone[0]["diverged_step"]
    assert packed[1]["status"] == lone[1]["status"] != "diverged"
    assert packed[1]["epochs_done"] == 2
    assert abs(packed[1]["test_loss"] - lone[1]["test_loss"]) < 2e-3


def test_can_pack_reasons():
    assert "at least 2" in can_pack([packed_cfg()])
    assert "same run" in can_pack([packed_cfg(), packed_cfg()])
    assert "batch_size differs" in can_pack([packed_cfg(seed=0), packed_cfg(seed=1, batch_size=16)])
    assert "dropout" in can_pack([packed_cfg(seed=0, dropout=0.1), packed_cfg(seed=1, dropout=0.1)])
    # probed per run
    assert can_pack([packed_cfg(seed=0, probe_every=5), packed_cfg(seed=1)]) is None
    assert "resnet18" in can_pack([packed_cfg(seed=0, model="resnet18"),
                                   packed_cfg(seed=1, model="resnet18")])
    assert can_pack([packed_cfg(seed=0, lr=0.1, init="kaiming"),
                     packed_cfg(seed=1, lr=0.3)]) is None
    assert "KerasBatchNorm" in can_pack([packed_cfg(seed=0, norm_options={"convention": "keras"}),
                                         packed_cfg(seed=1, norm_options={"convention": "keras"})])
    assert can_pack([packed_cfg(seed=0, init="fixup", norm="none"), packed_cfg(seed=1, norm="none"),
                     packed_cfg(seed=2, init="skipinit", norm="none"), packed_cfg(seed=3)]) is None
    assert can_pack([packed_cfg(seed=0, init="xavier"),
                     packed_cfg(seed=1, init="zero_residual")]) is None
    with pytest.raises(UserError, match="cannot be packed"):
        train_packed([packed_cfg(seed=0), packed_cfg(seed=1, epochs=3)], "unused")


def test_layers_without_packed_form_are_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    with pytest.raises(NotPackable, match="GroupNorm"):
        check_packable(model)


def test_pack_groups_splits_by_shared_settings():
    cfgs = [packed_cfg(seed=s, norm=n) for n in ("bn", "none") for s in range(3)]
    cfgs += [packed_cfg(seed=0, dropout=0.1), packed_cfg(seed=9, norm="bn", lr=0.3)]
    groups = pack_groups(cfgs, max_k=2)
    assert sorted(len(g) for g in groups) == [1, 1, 2, 2, 2]
    assert sorted(c.run_id() for g in groups for c in g) == sorted(c.run_id() for c in cfgs)
    for g in groups:
        if len(g) > 1:
            assert can_pack(g) is None
    assert [len(g) for g in pack_groups(cfgs[:3])] == [3]
    assert [len(g) for g in pack_groups(cfgs[:6])] == [6]  # BN and no-BN runs: one pack
    unpackable = [packed_cfg(seed=s, norm=n, dropout=0.1) for n in ("bn", "none") for s in range(2)]
    assert [len(g) for g in pack_groups(unpackable)] == [1, 1, 1, 1]


def test_the_speed_measurement_grid_trains_as_one_pack():
    # docs/speed.md's 30-epoch GPU times are of this grid, measured as one pack of 12 runs
    from pathlib import Path

    from bnlab.study.spec import expand, load_spec

    spec = Path(__file__).resolve().parent.parent / "benchmarks" / "seed_cifar10_30.toml"
    cfgs = [r.cfg for r in expand(load_spec(str(spec))).runs]
    assert len(cfgs) == 12 and can_pack(cfgs) is None
    assert len(pack_groups(cfgs)) == 1


def _stop_in_epoch_2(line):
    if "epoch 2/2" in line:  # logged once every run of the pack has stored epoch 1
        raise KeyboardInterrupt


def _cut_after_epoch_1(cfgs, out, bundle):
    with pytest.raises(KeyboardInterrupt):
        train_packed(cfgs, out, bundle=bundle, log=_stop_in_epoch_2)
    return Store(out)


def test_packed_runs_are_not_resumed_or_reused_on_other_data(small, tmp_path):
    cfgs = [packed_cfg(seed=0), packed_cfg(seed=1)]
    a = dataclasses.replace(small, fingerprint="AAAA")
    b = dataclasses.replace(small, fingerprint="BBBB")
    store = _cut_after_epoch_1(cfgs, tmp_path, a)
    with pytest.raises(DataMismatch, match="trained on other data"):
        train_packed(cfgs, tmp_path, bundle=b, **QUIET)
    for c in cfgs:  # untouched: still at epoch 1 of data AAAA
        run = store.run(c.run_id())
        assert run.read_json("config.json")["data"]["fingerprint"] == "AAAA"
        assert run.summary["status"] == "running" and run.summary["epochs_done"] == 1
    with pytest.raises(DataMismatch, match="trained on other data"):
        train_run(cfgs[0], tmp_path, resume=True, bundle=b, **QUIET)
    done = train_packed(cfgs, tmp_path, bundle=a, **QUIET)
    assert [s["epochs_done"] for s in done] == [2, 2]
    with pytest.raises(DataMismatch, match="trained on other data"):  # finished runs too
        train_packed(cfgs, tmp_path, bundle=b, **QUIET)


def test_a_problem_of_one_packed_run_fails_that_run_alone(small, tmp_path):
    """A checkpoint that does not fit its model and a run of another world size are the runs'
    own failures, as in train_run; the third run of the pack trains to the end."""
    cfgs = [packed_cfg(seed=0), packed_cfg(seed=1), packed_cfg(seed=2)]
    store = _cut_after_epoch_1(cfgs, tmp_path, small)
    bad = store.run(cfgs[0].run_id())
    state = bad.load_checkpoint()
    state["model"].pop("fc.weight")
    bad.save_checkpoint(state)
    other = store.run(cfgs[1].run_id())
    config = other.read_json("config.json")
    other.write_json("config.json", {**config, "distributed": {"world_size": 2}})
    out = train_packed(cfgs, tmp_path, bundle=small, **QUIET)
    assert out[0]["status"] == "failed" and "fc.weight" in out[0]["error"]
    assert out[1]["status"] == "failed" and "2 process(es)" in out[1]["error"]
    assert out[2]["status"] in FINISHED and out[2]["epochs_done"] == 2
    for s in out[:2]:  # what they had done is kept
        assert s["epochs_done"] == 1
        assert store.run(s["run_id"]).summary == s
        assert (store.run(s["run_id"]).path / "error.txt").is_file()


def test_packed_rows_have_the_lone_rows_keys_and_top5(small, tmp_path):
    cfgs = [packed_cfg(seed=0, epochs=1, lr=0.01),
            packed_cfg(seed=1, epochs=1, norm="none", lr=0.005)]
    train_packed(cfgs, tmp_path / "p", bundle=small, **QUIET)
    train_run(cfgs[0], tmp_path / "s", bundle=small, **QUIET)
    lone_row = Store(tmp_path / "s").run(cfgs[0].run_id()).metrics()[-1]

    for c in cfgs:
        run = Store(tmp_path / "p").run(c.run_id())
        row = run.metrics()[-1]
        assert set(row) - {"packed"} == set(lone_row)  # `packed`: the size of its pack
        # the same weights evaluated alone, by the lone loop's evaluation
        torch.manual_seed(c.seed)
        model = build_for(c, small)
        model.load_state_dict(run.load_checkpoint()["model"])
        loader = make_loader(small, False, c.eval_batch_size, torch.device("cpu"), False, c.seed)
        ev = evaluate_topk(model, loader, torch.device("cpu"))
        assert row["test_acc5"] == ev["acc5"] and row["test_acc"] == ev["acc"]
        assert abs(row["test_loss"] - ev["loss"]) < 1e-5 * max(1.0, ev["loss"])
