"""Fixup (Zhang et al. 2019) for torchvision's ResNets without norms (resnet18/50 and
`torchvision:NAME` of the ResNet, ResNeXt and Wide ResNet families)."""

from __future__ import annotations

import torch
from torch import nn


class FixupBlock(nn.Module):
    """A torchvision BasicBlock (m = 2 convs) or Bottleneck (m = 3) without norms, with Fixup's
    scalars (Zhang et al. 2019): a bias before every conv and every ReLU of the branch, and one
    multiplier before the branch's last bias:

        h_0 = x;  h_i = relu(conv_i(h_{i-1} + a_i) + b_i)          for i < m
        branch = conv_m(h_{m-1} + a_m) * scale + b_m
        out = relu(branch + shortcut(x + a_1))     (shortcut: identity, or the 1x1 conv)

    The convs keep their names (conv1 ... conv3, downsample), so state-dict keys and probes
    find the same layers as in the block it replaces.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1, self.conv2 = block.conv1, block.conv2
        self.conv3 = getattr(block, "conv3", None)
        self.downsample = block.downsample
        m = self.depth
        self.bias_in = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(m)])
        self.bias_out = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(m)])
        self.scale = nn.Parameter(torch.ones(1))

    @property
    def depth(self) -> int:
        return 2 if self.conv3 is None else 3

    @property
    def convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2] + ([] if self.conv3 is None else [self.conv3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        convs = self.convs
        for i, conv in enumerate(convs):
            out = conv(out + self.bias_in[i])
            if i < len(convs) - 1:
                out = torch.relu(out + self.bias_out[i])
        out = out * self.scale + self.bias_out[len(convs) - 1]
        shortcut = x if self.downsample is None else self.downsample(x + self.bias_in[0])
        return torch.relu(out + shortcut)


@torch.no_grad()
def fixup_torchvision(model: nn.Module) -> nn.Module:
    """Fixup on an already kaiming-initialized torchvision ResNet without norms (a model whose
    `.net` is the torchvision ResNet): every block becomes a FixupBlock, the convs inside a
    branch except the last are multiplied by L^(-1/(2m-2)) (L blocks; m = 2 for BasicBlock, 3
    for Bottleneck, so L^(-1/4) in ResNet-50), the last conv of each branch and the classifier
    (weights and bias) start at 0."""
    import torchvision  # here, not at import: it takes a second or more (names.torchvision_blocks)

    tv = torchvision.models.resnet
    stages = [getattr(model.net, f"layer{i}") for i in range(1, 5)]
    blocks = [b for s in stages for b in s if isinstance(b, tv.BasicBlock | tv.Bottleneck)]
    for stage in stages:
        for i, b in enumerate(stage):
            stage[i] = FixupBlock(b)
    for b in (b for s in stages for b in s):
        factor = len(blocks) ** (-1.0 / (2 * b.depth - 2))
        for conv in b.convs[:-1]:
            conv.weight.mul_(factor)
        b.convs[-1].weight.zero_()
    model.classifier.weight.zero_()
    model.classifier.bias.zero_()
    return model
