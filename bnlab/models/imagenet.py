"""torchvision's ImageNet ResNets with any norm from bnlab.norm."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from bnlab.norm import has_bias_substitute, make_norm


class TorchvisionResNet(nn.Module):
    """Wraps torchvision's resnet18/resnet50 so that every model in bnlab has `.classifier`."""

    def __init__(self, arch: str, num_classes: int, in_channels: int, norm: str,
                 dropout: float, norm_options: dict | None = None):
        super().__init__()
        opts = dict(norm_options or {})
        self.norm, self.norm_options = norm, opts
        net = getattr(torchvision.models, arch)(
            weights=None, num_classes=num_classes, norm_layer=lambda c: make_norm(norm, c, **opts))
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        if has_bias_substitute(norm, opts):
            # torchvision's convs have no bias because BN follows them; without BN they need one.
            for m in net.modules():
                if isinstance(m, nn.Conv2d) and m.bias is None:
                    m.bias = nn.Parameter(torch.zeros(m.out_channels))
        if dropout > 0:
            net.fc = nn.Sequential(nn.Dropout(dropout), net.fc)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def classifier(self) -> nn.Linear:
        fc = self.net.fc
        return fc[-1] if isinstance(fc, nn.Sequential) else fc
