"""Probes: closed-form cases computed independently in numpy (raw gradients under clipping, ICS
in forward order, smoothness at lr-relative and absolute step sizes), the default layers, a
probed run that follows the unprobed trajectory bit for bit, and the refusal under
data-parallel training."""

import hashlib
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.config import NOT_IN_ID, OPTIONAL_IN_ID, from_mapping
from bnlab.models import build_model
from bnlab.store import Store
from bnlab.train import train_run
from bnlab.train.probes import (
    STEP_MULTIPLES,
    UNITS_PER_LAYER,
    Prober,
    activation_stats,
    default_layers,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SMOOTHNESS = {f"{m}_{s}" for m in ("loss_variation", "grad_predictiveness", "beta_smoothness")
              for s in ("lr", "abs")}
CONTRACT_METRICS = {"act_mean", "act_std", "act_p15", "act_p50", "act_p85", "unit_p15",
                    "unit_p50", "unit_p85", "grad_norm", "grad_norm_clipped", "weight_norm",
                    "norm_weight_mean", "norm_bias_mean", "running_mean_mean",
                    "running_var_mean", "ics_l2", "ics_cos"} | SMOOTHNESS


def test_activation_stats_closed_form():
    s = activation_stats(torch.arange(101.0).view(1, 101))
    # 0..100: mean 50, population variance (101^2 - 1) / 12 = 850, order statistics exact
    assert s == pytest.approx({"act_mean": 50.0, "act_std": 850 ** 0.5, "act_p15": 15.0,
                               "act_p50": 50.0, "act_p85": 85.0})


def _np_loss_grads(x, y, w1, w2, shift):
    """Cross-entropy of logits x w1^T w2^T + shift and its gradients, by hand in float64."""
    h = x @ w1.T
    z = h @ w2.T + shift
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y]).mean()
    d = p.copy()
    d[np.arange(n), y] -= 1
    d /= n
    return loss, (d @ w2).T @ x, d.T @ h, d.sum(0), h


class Shifted(nn.Module):
    """Two linear layers and a logit shift that is registered first but used last: the order
    of named_parameters() is not the forward order."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor([0.4, -0.3]))
        self.body = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))

    def forward(self, x):
        return self.body(x) + self.shift


def _landscape(xd, yn, ws, g, etas):
    """loss variation, gradient predictiveness, beta smoothness along -g at step sizes etas."""
    loss0 = _np_loss_grads(xd, yn, *ws)[0]
    losses, diffs, betas = [loss0], [], []
    gnorm = np.sqrt(sum((a ** 2).sum() for a in g))
    for eta in etas:
        le, *h, _ = _np_loss_grads(xd, yn, *(w - eta * a for w, a in zip(ws, g)))
        losses.append(le)
        d = np.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(g, h)))
        diffs.append(d)
        betas.append(d / (eta * gnorm))
    return max(losses) - min(losses), max(diffs), max(betas)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_prober_matches_hand_computation(clip):
    torch.manual_seed(0)
    model = Shifted()
    assert [n for n, _ in model.named_parameters()][0] == "shift"
    lr, steps = 0.5, (0.1, 1.5)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    crit = nn.CrossEntropyLoss()
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [2.0, 0.5, -1.0], [-1.0, -1.0, 3.0],
                      [0.5, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0, 1])
    ws = [m.weight.detach().double().numpy().copy() for m in model.body]
    ws.append(model.shift.detach().double().numpy().copy())
    prober = Prober(model, opt, crit, every=1, grad_clip=clip, steps=steps,
                    layers=[("0", "body.0", "input"), ("1", "body.1", "input")])
    prober.start(0, 1, x, y)
    loss = crit(model(x), y)
    opt.zero_grad()
    loss.backward()
    prober.gradients_ready()  # as the training loop does, before clipping
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    prober.close()
    got = {(r["layer"], r["metric"]): r["value"] for r in prober.rows if "unit" not in r}

    xd, yn = x.double().numpy(), y.numpy()
    _, g1, g2, gs, h = _np_loss_grads(xd, yn, *ws)
    for layer, a in (("0", xd), ("1", h)):
        assert got[(layer, "act_mean")] == pytest.approx(a.mean(), rel=1e-5)
        assert got[(layer, "act_std")] == pytest.approx(a.std(), rel=1e-5)
        for q in (15, 50, 85):
            assert got[(layer, f"act_p{q}")] == pytest.approx(np.percentile(a, q), rel=1e-5,
                                                              abs=1e-6)
    # gradients as the backward pass left them, before any clipping
    raw = np.sqrt((g1 ** 2).sum() + (g2 ** 2).sum() + (gs ** 2).sum())
    assert got[("body.0", "grad_norm")] == pytest.approx(np.linalg.norm(g1), rel=1e-5)
    assert got[("body.1", "grad_norm")] == pytest.approx(np.linalg.norm(g2), rel=1e-5)
    assert got[("", "grad_norm")] == pytest.approx(raw, rel=1e-5)
    assert got[("body.1", "weight_norm")] == pytest.approx(np.linalg.norm(ws[1]), rel=1e-6)
    scale = min(1.0, clip / raw) if clip else 1.0  # clip_grad_norm_: g * clip / ||g||
    if clip:
        assert raw > 10 * clip and got[("", "grad_norm_clipped")] == pytest.approx(clip, rel=1e-5)
    else:
        assert ("", "grad_norm_clipped") not in got
    # ICS of body.1: its gradient after body.0 took its step; the shift, used after body.1 in
    # the forward pass (though registered first), and body.1 itself still at W_t
    w1_next = ws[0] - lr * scale * g1
    _, _, g2_after, _, _ = _np_loss_grads(xd, yn, w1_next, ws[1], ws[2])
    assert got[("body.1", "ics_l2")] == pytest.approx(np.linalg.norm(g2 - g2_after), rel=1e-4)
    cos = (g2 * g2_after).sum() / np.linalg.norm(g2) / np.linalg.norm(g2_after)
    assert got[("body.1", "ics_cos")] == pytest.approx(cos, rel=1e-5)
    _, _, g2_wrong, _, _ = _np_loss_grads(xd, yn, w1_next, ws[1], ws[2] - lr * scale * gs)
    wrong, right = np.linalg.norm(g2 - g2_wrong), np.linalg.norm(g2 - g2_after)
    assert abs(wrong - right) > 0.01 * right  # registration order: 100x the tolerance away
    assert ("body.0", "ics_l2") not in got  # the first layer has no earlier layers
    # the landscape along -g (unclipped) at lr-relative and at absolute step sizes
    g = [g1, g2, gs]
    for suffix, etas in (("lr", [lr * m for m in STEP_MULTIPLES]), ("abs", steps)):
        variation, predictiveness, beta = _landscape(xd, yn, ws, g, etas)
        assert got[("", f"loss_variation_{suffix}")] == pytest.approx(variation, rel=1e-4)
        assert got[("", f"grad_predictiveness_{suffix}")] == pytest.approx(predictiveness,
                                                                          rel=1e-4)
        assert got[("", f"beta_smoothness_{suffix}")] == pytest.approx(beta, rel=1e-4)
    # the update itself is untouched: W_{t+1} = W_t - lr g (clipped)
    np.testing.assert_allclose(model.body[0].weight.detach().double().numpy(), w1_next,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.shift.detach().double().numpy(),
                               ws[2] - lr * scale * gs, rtol=1e-5, atol=1e-7)
    # per-unit percentiles of the (N, C) activations: UNITS_PER_LAYER of their C features
    units = {(r["layer"], r["unit"]) for r in prober.rows if "unit" in r}
    assert {u for layer, u in units if layer == "0"} == set(range(min(3, UNITS_PER_LAYER)))
    assert len({u for layer, u in units if layer == "1"}) == min(4, UNITS_PER_LAYER)
    for r in prober.rows:
        if "unit" in r:
            a = xd if r["layer"] == "0" else h
            q = int(r["metric"].removeprefix("unit_p"))
            assert r["value"] == pytest.approx(np.percentile(a[:, r["unit"]], q), rel=1e-5,
                                               abs=1e-6)


def test_default_layers_same_positions_with_and_without_norm():
    cfg_bn = from_mapping(dict(model="resnet20", norm="bn", probe_every=1))
    cfg_none = from_mapping(dict(model="resnet20", norm="none", probe_every=1))
    a = default_layers(cfg_bn, build_model("resnet20", 10, norm="bn"))
    b = default_layers(cfg_none, build_model("resnet20", 10, norm="none"))
    assert a == b and len(a) == 19 + 9  # 19 norm inputs, 9 block outputs
    assert ("blocks.0.n1", "blocks.0.n1", "input") in a and ("dropout", "dropout", "input") \
        not in a
    cfg_mlp = from_mapping(dict(model="mlp3x100", norm="none", probe_every=1))
    m = default_layers(cfg_mlp, build_model("mlp3x100", 10, norm="none", in_channels=1,
                                            image_size=28))
    assert ("hidden.0.sigmoid", "hidden.0.norm", "output") in m and len(m) == 6


GRAD_CLIP = 0.5  # below the raw gradient norm of every step of _run (about 4-5): clipping acts


def _run(tmp_path, probe_every, tensorboard=False):
    cfg = from_mapping(dict(dataset="synthetic", model="mlp3x100", norm="bn", dropout=0.3,
                            limit_train=64, limit_test=64, batch_size=16, epochs=2, lr=0.05,
                            grad_clip=GRAD_CLIP, probe_every=probe_every,
                            tensorboard=tensorboard, device="cpu"))
    out = tmp_path / f"p{probe_every}"
    train_run(cfg, out, log=lambda m: None)
    return Store(out).run(cfg.run_id())


def test_probes_leave_the_trajectory_unchanged(tmp_path):
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # an optional extra
    off = _run(tmp_path, 0)
    on = _run(tmp_path, 1, tensorboard=tensorboard)
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    assert [[m[k] for k in keys] for m in off.metrics()] == \
        [[m[k] for k in keys] for m in on.metrics()]
    sa, sb = off.load_checkpoint()["model"], on.load_checkpoint()["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # incl. BN running statistics
    assert not (off.path / "probes.jsonl").exists()
    rows = on.read_rows("probes.jsonl")
    assert {r["metric"] for r in rows} == CONTRACT_METRICS
    assert {r["step"] for r in rows} == set(range(8)) and {r["epoch"] for r in rows} == {1, 2}
    for r in rows:
        unit = r["metric"].startswith("unit_")
        assert set(r) == {"step", "epoch", "layer", "metric", "value"} | ({"unit"} if unit else
                                                                          set())
    # the gradient before clipping, and the norm the update used
    raw = {r["step"]: r["value"] for r in rows if (r["layer"], r["metric"]) == ("", "grad_norm")}
    used = {r["step"]: r["value"] for r in rows
            if (r["layer"], r["metric"]) == ("", "grad_norm_clipped")}
    assert min(raw.values()) > 2 * GRAD_CLIP
    assert used == pytest.approx(dict.fromkeys(range(8), GRAD_CLIP), rel=1e-5)
    # the same units at every step, fixed by the seed: UNITS_PER_LAYER of 100 per layer
    units = {}
    for r in rows:
        if r["metric"] == "unit_p50":
            units.setdefault(r["layer"], {}).setdefault(r["step"], set()).add(r["unit"])
    for per_step in units.values():
        (chosen,) = {frozenset(u) for u in per_step.values()}
        assert len(chosen) == UNITS_PER_LAYER and chosen <= set(range(100))
    act_layers = {r["layer"] for r in rows if r["metric"] == "act_p50"}
    assert act_layers == {"hidden.0.sigmoid", "hidden.1.sigmoid", "hidden.2.sigmoid",
                          "hidden.0", "hidden.1", "hidden.2"}
    if tensorboard:
        board = on.path.parent / "tensorboard" / on.run_id
        assert any(board.glob("events.out.tfevents.*"))
        assert any((board / "probes").glob("events.out.tfevents.*"))


def test_resumed_run_has_the_same_probes(tmp_path):
    cfg = from_mapping(dict(dataset="synthetic", model="mlp3x100", norm="bn", limit_train=64,
                            limit_test=32, batch_size=16, epochs=3, probe_every=3,
                            device="cpu"))
    train_run(cfg, tmp_path / "whole", log=lambda m: None)

    def stop_after_epoch_1(msg):  # logged once epoch 1 is stored
        if "epoch 1/3" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "cut", log=stop_after_epoch_1)
    cut = Store(tmp_path / "cut").run(cfg.run_id())
    assert {r["epoch"] for r in cut.read_rows("probes.jsonl")} == {1}
    train_run(cfg, tmp_path / "cut", resume=True, log=lambda m: None)
    whole = Store(tmp_path / "whole").run(cfg.run_id())
    assert cut.read_rows("probes.jsonl") == whole.read_rows("probes.jsonl")
    assert {r["step"] for r in whole.read_rows("probes.jsonl")} == {0, 3, 6, 9}


def test_probes_leave_a_resnet_trajectory_unchanged_with_the_fused_cpu_kernels(tmp_path):
    """Probes read each norm's input through a forward pre-hook, which the fused CPU path
    (bnlab.fast.cpu_kernels) calls itself: probed and unprobed steps run the same kernels."""
    def run(probe_every):
        cfg = from_mapping(dict(dataset="synthetic", model="resnet20", norm="bn",
                                limit_train=32, limit_test=16, batch_size=8, epochs=1,
                                lr=0.05, probe_every=probe_every, device="cpu"))
        out = tmp_path / f"r{probe_every}"
        train_run(cfg, out, log=lambda m: None)
        return Store(out).run(cfg.run_id())

    off, on = run(0), run(2)
    assert json.loads((off.path / "config.json").read_text())["env"]["cpu_kernels"] == "fused"
    keys = ("train_loss", "test_loss", "test_acc")
    assert [[m[k] for k in keys] for m in off.metrics()] == \
        [[m[k] for k in keys] for m in on.metrics()]
    sa, sb = off.load_checkpoint()["model"], on.load_checkpoint()["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(r["metric"] == "act_p50" and r["layer"] == "blocks.0.n1"
               for r in on.read_rows("probes.jsonl"))


def test_probes_are_refused_on_more_than_one_process(tmp_path, monkeypatch, capsys):
    """One line, exit 2, before torchrun starts (--nproc) or a process group is joined (each
    process under torchrun), and nothing written."""
    from bnlab.cli import main
    from bnlab.errors import UserError

    argv = ["train", "--dataset", "synthetic", "--device", "cpu", "--probe-every", "5",
            "--out", str(tmp_path)]
    assert main(argv + ["--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "probe_every 5 needs a single process, got 2" in err
    cfg = from_mapping(dict(dataset="synthetic", limit_train=32, limit_test=16, batch_size=8,
                            epochs=1, probe_every=5, device="cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for rank 0 of 2
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match="got 2 processes"):
        train_run(cfg, tmp_path, log=lambda m: None)
    assert not any(tmp_path.iterdir())


def test_probe_step_sizes_option():
    base = dict(dataset="synthetic", probe_every=5)
    default = from_mapping(base)
    assert default.probe_step_sizes == "0.005,0.05,0.5"
    # a TOML array and the flag's text give the same run
    listed = from_mapping({**base, "probe_step_sizes": [0.01, 0.1]})
    assert listed == from_mapping({**base, "probe_step_sizes": "0.01,0.1"})
    assert listed.run_id() != default.run_id()
    # at the default (and without probes) the option leaves the run id as it was before it
    # existed: the id hashes the other fields only
    old = {k: v for k, v in default.to_dict().items()
           if k not in NOT_IN_ID | OPTIONAL_IN_ID}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:8]
    assert "probe_step_sizes" not in old and default.run_id().endswith(digest)
    off = from_mapping(dict(dataset="synthetic"))
    assert off.run_id() == from_mapping(dict(dataset="synthetic", probe_step_sizes="1")).run_id()
    from bnlab.errors import UserError
    for bad in ("", "0.1,-1", "a", "0", "inf"):
        with pytest.raises(UserError, match="probe_step_sizes must be"):
            from_mapping({**base, "probe_step_sizes": bad})
