"""The built-in studies of the new models expand to the arms they promise."""

from __future__ import annotations

from collections import Counter

from bnlab.study.preflight import preflight
from bnlab.study.spec import expand, load_spec

TUNED_LRS = [0.005, 0.01, 0.02, 0.04]  # the protocol grid of docs/studies.md


def _arms(name: str) -> tuple[Counter, list]:
    """Every planned run by its arm, the tuned arm's runs (waiting for their lr) under lr None,
    and the tuning runs under ("tune", lr, epochs)."""
    plan = expand(load_spec(name))
    preflight(plan)
    arms = Counter()
    for r in plan.runs + plan.waiting:
        c = r.cfg
        lr = None if r in plan.waiting else c.lr
        arms[(c.model, c.norm, c.placement, c.first_k, c.init, lr, c.warmup_epochs)] += 1
        assert c.probe_every > 0 and c.grad_clip == 0 and c.dataset == "cifar10"
    for r in plan.tune_runs:
        c = r.cfg
        arms[("tune", c.model, c.lr, c.epochs, c.seed, c.warmup_epochs)] += 1
        assert c.probe_every == 0  # tuning runs are read for their validation accuracy only
    return arms, plan.runs


def test_residual_bn_is_the_factorial_with_the_no_bn_protocol():
    arms, runs = _arms("residual-bn")
    want = Counter()
    for model in ("plain20", "resnet20", "plain56", "resnet56"):
        want[(model, "bn", "post_conv", 1, "kaiming", 0.1, 0.0)] = 3          # (a)
        want[(model, "none", "post_conv", 1, "kaiming", 0.1, 0.0)] = 3        # (b)
        want[(model, "none", "post_conv", 1, "kaiming", None, 2.0)] = 3       # (c)
        for lr in TUNED_LRS:  # (c)'s lr: tuned on seed 0 for 6 of the 30 epochs
            want[("tune", model, lr, 6, 0, 2.0)] = 1
        if model.startswith("resnet"):                                        # (d)
            want[(model, "none", "post_conv", 1, "fixup", 0.1, 0.0)] = 3
    assert arms == want
    assert {(r.cfg.schedule, r.cfg.momentum, r.cfg.weight_decay, r.cfg.batch_size)
            for r in runs} == {("step", 0.9, 1e-4, 128)}
    assert load_spec("residual-bn").tune.values == tuple(TUNED_LRS)


def test_vgg_bn_arms():
    arms, _ = _arms("vgg-bn")
    want = Counter({("vgg16", "bn", "post_conv", 1, "kaiming", 0.1, 0.0): 3,
                    ("vgg16", "bn", "post_act", 1, "kaiming", 0.1, 0.0): 3,
                    ("vgg16", "none", "post_conv", 1, "kaiming", 0.1, 0.0): 3})
    for k in (2, 4, 7):
        want[("vgg16", "bn", "first_k", k, "kaiming", 0.1, 0.0)] = 3
    want[("vgg16", "none", "post_conv", 1, "kaiming", None, 2.0)] = 3
    for lr in TUNED_LRS:
        want[("tune", "vgg16", lr, 6, 0, 2.0)] = 1
    assert arms == want
    assert load_spec("vgg-bn").tune.values == tuple(TUNED_LRS)
