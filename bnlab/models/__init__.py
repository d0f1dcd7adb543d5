"""Models: the networks bnlab trains, their weight initializations, and the grouped network
that trains K of them at once.

names.py         the networks' names and defining numbers, without torch (specs, estimates)
build.py         models by name (`build_model`, `MODELS`) and the model of a run config
cifar_resnet.py  He et al. 2016's CIFAR ResNets (option-A shortcuts) and their plain nets
vgg.py           VGG-11/13/16/19 for CIFAR
mlp.py           Ioffe & Szegedy 2015's 3x100 sigmoid MLP
torchvision_swap.py  any torchvision classification model with its BatchNorms swapped
imagenet.py      Fixup for torchvision's ResNets
init.py          weight initializations by name (`init_weights`, `INITS`)
entry.py         the user's own network, model = "entry:MODULE:FUNCTION" (`NormFactory`)
grouped.py       K networks of one architecture as one grouped network (packed training)
norm_act.py      the norm-ReLU(-add) step of the forwards: torch's ops, or fused when built so

The names below are imported from build.py when first used, so that `bnlab.models.names` is
read without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bnlab.models.build import MODELS, build_for, build_model, count_parameters, family_lines

__all__ = ["MODELS", "build_for", "build_model", "count_parameters", "family_lines"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("bnlab.models.build"), name)
    raise AttributeError(f"module 'bnlab.models' has no attribute {name!r}")
