"""The MLP of Ioffe & Szegedy 2015, Fig. 1: three hidden layers of 100 sigmoid units (MNIST).

Normalization sits where the paper puts BN: on the input of each sigmoid (Linear -> norm ->
sigmoid). Each hidden layer is a `Hidden` module so probes can hook the sigmoid input.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.norm import has_bias_substitute, make_norm


class Hidden(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str, norm_options: dict):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=has_bias_substitute(norm, norm_options))
        self.norm = make_norm(norm, cout, dim=1, **norm_options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.norm(self.linear(x)))


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int = 10, hidden: int = 100,
                 layers: int = 3, norm: str = "bn", dropout: float = 0.0,
                 norm_options: dict | None = None):
        super().__init__()
        dims = [in_features] + [hidden] * layers
        self.hidden = nn.Sequential(*[Hidden(a, b, norm, dict(norm_options or {}))
                                      for a, b in zip(dims[:-1], dims[1:])])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.hidden(torch.flatten(x, 1))))

    @property
    def classifier(self) -> nn.Linear:
        return self.fc
