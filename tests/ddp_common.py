"""Configurations shared by tests/test_distributed.py and the torchrun worker it starts."""

from __future__ import annotations

import dataclasses

from bnlab.config import RunConfig
from bnlab.data.synthetic import make_synthetic

SHARD_BATCH = 16  # global batch of the statistics check: 8 images per process
# cpu_kernels off: the runs compared here use different norm layers (BN on shards vs ghost BN on
# one process), and only torch's batch-norm kernel gives both the same float32 arithmetic; after
# 6 steps their test losses (~14, running statistics far from the batch ones) would otherwise
# differ by ~0.5% from rounding alone (tests/test_cpu_kernels.py checks the fused kernel).
_COMMON = dict(dataset="synthetic", model="resnet20", batch_size=16, epochs=2,
               schedule="constant", lr=0.01, eval_batch_size=32, workers=0, device="cpu",
               cpu_kernels=False)
GROUP_CFG = RunConfig(**_COMMON, norm="group", seed=3)
# virtual batch 4 divides the 8 images per process: the same ghost batches as on one device
GHOST_CFG = RunConfig(**_COMMON, norm="ghost", norm_options={"virtual_batch_size": 4}, seed=5)
BN_CFG = RunConfig(**_COMMON, norm="bn", seed=4)
# BN on 2 processes normalizes over 8 images each: ghost BN with virtual batch 8 on one device
BN_AS_GHOST_CFG = dataclasses.replace(BN_CFG, norm="ghost",
                                      norm_options={"virtual_batch_size": 8})


def bundle_for(cfg: RunConfig):
    """48 training images (3 steps per epoch) and 32 test images of 16 px."""
    return make_synthetic(n_train=48, n_test=32, size=16, seed=cfg.seed)
