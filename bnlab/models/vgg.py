"""VGG for CIFAR: Simonyan & Zisserman 2015's configurations of 3x3 convolutions and 2x2
max-pools, with one linear classifier instead of the three fully connected layers.

The variant followed is the one of kuangliu/pytorch-cifar (models/vgg.py), which most CIFAR code
and papers mean by "VGG-11/16 on CIFAR": the convolutional part of configurations A (VGG-11),
B (13), D (16) and E (19) with padding 1, a norm and a ReLU after every conv, five max-pools that
take 32 px images to 1x1, and one linear layer from the 512 channels to the classes. Here the
last pool's output is averaged over its positions (adaptive average pooling to 1x1), which is
the identity at 32 px and lets larger images through.

Placements, as in the CIFAR ResNets:
    post_conv   conv -> norm -> ReLU
    post_act    conv -> ReLU -> norm
    first_k     post_conv with norms in the first k conv layers only (the others: norm none)
A conv carries a bias exactly when its norm has no shift of its own
(bnlab.norm.has_bias_substitute), in every placement, as in the ResNets; a norm of 'none' is an
nn.Identity kept in place so that probes find the same positions in every variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.config import PLACEMENTS
from bnlab.errors import UserError, unknown
from bnlab.models.names import POOL
from bnlab.models.names import VGG_CONFIGS as CONFIGS
from bnlab.models.norm_act import NormAct
from bnlab.norm import has_bias_substitute, make_norm


def conv_layers(arch: str) -> int:
    return sum(1 for c in CONFIGS[arch] if c != POOL)


class ConvUnit(nn.Module):
    """One 3x3 conv (padding 1) with its norm and ReLU, in the order of `placement`."""

    def __init__(self, cin: int, cout: int, norm: str, placement: str, norm_options: dict):
        super().__init__()
        self.placement, self.norm_name = placement, norm
        self.conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=has_bias_substitute(norm, norm_options))
        self.norm = make_norm(norm, cout, **norm_options)
        self.act = NormAct()  # norm and ReLU as one step (one CPU kernel when built fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "post_act":
            return self.norm(F.relu(self.conv(x)))
        return self.act(self.norm, self.conv(x))


class CifarVGG(nn.Module):
    def __init__(self, arch: str, num_classes: int = 10, in_channels: int = 3,
                 norm: str = "bn", placement: str = "post_conv", first_k: int = 1,
                 dropout: float = 0.0, norm_options: dict | None = None,
                 image_size: int = 32):
        super().__init__()
        if arch not in CONFIGS:
            raise unknown("VGG", arch, CONFIGS)
        if placement not in PLACEMENTS:
            raise unknown("placement", placement, PLACEMENTS)
        convs = conv_layers(arch)
        pools = CONFIGS[arch].count(POOL)
        if placement == "first_k" and not 0 <= first_k <= convs:
            raise UserError(f"first_k must be between 0 and {convs} (the conv layers of {arch}), "
                            f"got {first_k}")
        if image_size < 2 ** pools:
            raise UserError(f"{arch} halves its input {pools} times (2x2 max-pools) and needs "
                            f"images of at least {2 ** pools} px, got {image_size} px")
        opts = dict(norm_options or {})
        self.arch, self.placement, self.norm, self.norm_options = arch, placement, norm, opts
        layers: list[nn.Module] = []
        cin, index = in_channels, 0
        for c in CONFIGS[arch]:
            if c == POOL:
                layers.append(nn.MaxPool2d(2, 2))
                continue
            unit_norm = "none" if placement == "first_k" and index >= first_k else norm
            layers.append(ConvUnit(cin, c, unit_norm, "post_act" if placement == "post_act"
                                   else "post_conv", opts if unit_norm == norm else {}))
            cin, index = c, index + 1
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.fc(self.dropout(x))

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def block_names(self) -> list[str]:
        """The conv units, whose outputs probes record as block outputs."""
        return [f"features.{i}" for i, m in enumerate(self.features) if isinstance(m, ConvUnit)]
