"""Configurations shared by tests/test_distributed.py and the torchrun worker it starts."""

from __future__ import annotations

import contextlib

from torch import nn

import bnlab.train as train_mod
from bnlab.config import RunConfig
from bnlab.data.synthetic import make_synthetic

SHARD_BATCH = 16  # global batch of the statistics check: 8 images per process
_COMMON = dict(dataset="synthetic", model="resnet20", batch_size=16, epochs=2,
               schedule="constant", lr=0.05, eval_batch_size=32, workers=0, device="cpu")
GROUP_CFG = RunConfig(**_COMMON, norm="bn", seed=3)  # built with GroupNorm by patch_group
BN_CFG = RunConfig(**_COMMON, norm="bn", seed=4)


def bundle_for(cfg: RunConfig):
    """48 training images (3 steps per epoch) and 32 test images of 16 px."""
    return make_synthetic(n_train=48, n_test=32, size=16, seed=cfg.seed)


def to_group_norm(model: nn.Module, groups: int = 4) -> nn.Module:
    """Every BatchNorm2d -> GroupNorm over the same channels (a per-sample norm)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.GroupNorm(groups, child.num_features))
        else:
            to_group_norm(child, groups)
    return model


@contextlib.contextmanager
def patch_group():
    real = train_mod.build_for
    train_mod.build_for = lambda cfg, bundle: to_group_norm(real(cfg, bundle))
    try:
        yield
    finally:
        train_mod.build_for = real
