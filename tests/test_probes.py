"""Probes: a closed-form case computed independently in numpy, the default layers, and a
probed run that follows the unprobed trajectory bit for bit."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.config import from_mapping
from bnlab.models import build_model
from bnlab.store import Store
from bnlab.train import train_run
from bnlab.train.probes import STEP_MULTIPLES, Prober, activation_stats, default_layers

pytestmark = pytest.mark.usefixtures("one_thread")

CONTRACT_METRICS = {"act_mean", "act_std", "act_p15", "act_p50", "act_p85", "grad_norm",
                    "weight_norm", "norm_weight_mean", "norm_bias_mean", "running_mean_mean",
                    "running_var_mean", "ics_l2", "ics_cos", "loss_variation",
                    "grad_predictiveness", "beta_smoothness"}


def test_activation_stats_closed_form():
    s = activation_stats(torch.arange(101.0).view(1, 101))
    # 0..100: mean 50, population variance (101^2 - 1) / 12 = 850, order statistics exact
    assert s == pytest.approx({"act_mean": 50.0, "act_std": 850 ** 0.5, "act_p15": 15.0,
                               "act_p50": 50.0, "act_p85": 85.0})


def _np_loss_grads(x, y, w1, w2):
    """Cross-entropy of logits x w1^T w2^T and its gradients, by hand in float64."""
    h = x @ w1.T
    z = h @ w2.T
    z = z - z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    n = len(y)
    loss = -np.log(p[np.arange(n), y]).mean()
    d = p.copy()
    d[np.arange(n), y] -= 1
    d /= n
    return loss, (d @ w2).T @ x, d.T @ h, h


def test_prober_matches_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    crit = nn.CrossEntropyLoss()
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [2.0, 0.5, -1.0], [-1.0, -1.0, 3.0],
                      [0.5, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0, 1])
    w1, w2 = (m.weight.detach().double().numpy().copy() for m in model)
    prober = Prober(model, opt, crit, every=1, layers=[("0", "0", "input"), ("1", "1", "input")])
    prober.start(0, 1, x, y)
    loss = crit(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    prober.close()
    got = {(r["layer"], r["metric"]): r["value"] for r in prober.rows}

    xd, yn = x.double().numpy(), y.numpy()
    loss0, g1, g2, h = _np_loss_grads(xd, yn, w1, w2)
    for layer, a in (("0", xd), ("1", h)):
        assert got[(layer, "act_mean")] == pytest.approx(a.mean(), rel=1e-5)
        assert got[(layer, "act_std")] == pytest.approx(a.std(), rel=1e-5)
        for q in (15, 50, 85):
            assert got[(layer, f"act_p{q}")] == pytest.approx(np.percentile(a, q), rel=1e-5,
                                                              abs=1e-6)
    assert got[("0", "grad_norm")] == pytest.approx(np.linalg.norm(g1), rel=1e-5)
    assert got[("1", "grad_norm")] == pytest.approx(np.linalg.norm(g2), rel=1e-5)
    assert got[("", "grad_norm")] == pytest.approx(np.hypot(np.linalg.norm(g1),
                                                            np.linalg.norm(g2)), rel=1e-5)
    assert got[("1", "weight_norm")] == pytest.approx(np.linalg.norm(w2), rel=1e-6)
    # ICS of layer 1: its gradient after layer 0 took its SGD step, layer 1 still at W_t
    _, _, g2_after, _ = _np_loss_grads(xd, yn, w1 - lr * g1, w2)
    assert got[("1", "ics_l2")] == pytest.approx(np.linalg.norm(g2 - g2_after), rel=1e-4)
    cos = (g2 * g2_after).sum() / np.linalg.norm(g2) / np.linalg.norm(g2_after)
    assert got[("1", "ics_cos")] == pytest.approx(cos, rel=1e-5)
    assert ("0", "ics_l2") not in got  # the first layer has no earlier layers
    # the landscape along -g at step sizes lr * STEP_MULTIPLES
    losses, diffs, betas = [loss0], [], []
    gnorm = np.sqrt((g1 ** 2).sum() + (g2 ** 2).sum())
    for mult in STEP_MULTIPLES:
        eta = lr * mult
        le, h1, h2, _ = _np_loss_grads(xd, yn, w1 - eta * g1, w2 - eta * g2)
        losses.append(le)
        d = np.sqrt(((g1 - h1) ** 2).sum() + ((g2 - h2) ** 2).sum())
        diffs.append(d)
        betas.append(d / (eta * gnorm))
    assert got[("", "loss_variation")] == pytest.approx(max(losses) - min(losses), rel=1e-4)
    assert got[("", "grad_predictiveness")] == pytest.approx(max(diffs), rel=1e-4)
    assert got[("", "beta_smoothness")] == pytest.approx(max(betas), rel=1e-4)
    # the update itself is untouched: W_{t+1} = W_t - lr g
    np.testing.assert_allclose(model[0].weight.detach().double().numpy(), w1 - lr * g1,
                               rtol=1e-5, atol=1e-7)


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


def _run(tmp_path, probe_every, tensorboard=False):
    cfg = from_mapping(dict(dataset="synthetic", model="mlp3x100", norm="bn", dropout=0.3,
                            limit_train=64, limit_test=64, batch_size=16, epochs=2, lr=0.05,
                            probe_every=probe_every, tensorboard=tensorboard, device="cpu"))
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
    assert set(rows[0]) == {"step", "epoch", "layer", "metric", "value"}
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
