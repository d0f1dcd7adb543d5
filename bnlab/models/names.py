"""The names of bnlab's own networks and the numbers that define them, without torch: specs,
estimates, packing plans and `bnlab study list` read them without building a network.

DEPTHS        He et al. 2016's CIFAR ResNets (6n+2 layers); PLAIN_DEPTHS their plain nets
VGG_CONFIGS   Simonyan & Zisserman 2015's VGG channel plans (POOL: a 2x2 max-pool)
torchvision_blocks()  torchvision's ResNet block classes, once torchvision is loaded
PACKABLE_MODELS  the networks the grouped network (bnlab.models.grouped) trains K at once
"""

from __future__ import annotations

import sys

DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}
PLAIN_DEPTHS = {f"plain{d}": d for d in DEPTHS.values()}

POOL = "M"
VGG_CONFIGS = {
    "vgg11": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg13": (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg16": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL,
              512, 512, 512, POOL),
    "vgg19": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
              512, 512, 512, 512, POOL),
}
VGG_LETTERS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}  # the paper's columns

PACKABLE_MODELS = (*DEPTHS, *PLAIN_DEPTHS, *VGG_CONFIGS, "mlp3x100")


def torchvision_blocks() -> tuple[type, ...]:
    """torchvision's ResNet blocks (BasicBlock, Bottleneck) if torchvision is loaded, else ().
    Only torchvision builds these blocks, so a model can hold one only once torchvision has been
    imported; checking sys.modules spares the runs of bnlab's own networks that import (a second
    or more on a 2-core CPU, in every worker process)."""
    tv = sys.modules.get("torchvision.models.resnet")
    return (tv.BasicBlock, tv.Bottleneck) if tv is not None else ()
