"""Weight initializations by name, applied to a built model."""

from __future__ import annotations

from torch import nn

from bnlab.errors import unknown

INITS = {
    "kaiming": "He et al. 2015 (MSRA): N(0, 2/fan) for conv and linear weights, biases 0",
}


def init_weights(model: nn.Module, name: str = "kaiming", **options) -> nn.Module:
    """Initialize `model` in place with the scheme `name` and return it."""
    if name not in INITS:
        raise unknown("init", name, INITS)
    mode = options.get("mode", "fan_in")
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
