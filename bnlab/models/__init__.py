"""Models by name: `build_model(name, num_classes, norm=..., init=..., in_channels=...)`."""

from __future__ import annotations

from torch import nn

from bnlab.errors import UserError, unknown
from bnlab.init import init_weights
from bnlab.models.cifar_resnet import DEPTHS, CifarResNet
from bnlab.models.imagenet import TorchvisionResNet
from bnlab.models.mlp import MLP

MODELS = {
    **{name: f"CIFAR ResNet-{d} (He et al. 2016, sec. 4.2)" for name, d in DEPTHS.items()},
    "mlp3x100": "Ioffe & Szegedy 2015 Fig. 1: 3 hidden layers of 100 sigmoid units",
    "resnet18": "torchvision ResNet-18 (ImageNet-style data)",
    "resnet50": "torchvision ResNet-50 (ImageNet-style data)",
}


def build_model(name: str, num_classes: int, norm: str = "bn", init: str = "kaiming",
                in_channels: int = 3, image_size: int = 32, placement: str = "post_conv",
                first_k: int = 1, dropout: float = 0.0, norm_options: dict | None = None,
                init_options: dict | None = None) -> nn.Module:
    """Build and initialize a model; the norm and init are chosen by name."""
    if name in DEPTHS:
        model = CifarResNet(DEPTHS[name], num_classes, in_channels, norm, placement, first_k,
                            dropout, norm_options)
    elif name == "mlp3x100":
        if placement != "post_conv":
            raise UserError(f"placement {placement!r} applies to ResNets only; mlp3x100 puts "
                            "the norm before each sigmoid (use post_conv)")
        model = MLP(in_channels * image_size * image_size, num_classes, 100, 3, norm, dropout,
                    norm_options)
    elif name in ("resnet18", "resnet50"):
        if placement != "post_conv":
            raise UserError(f"placement {placement!r} is implemented for the CIFAR ResNets; "
                            f"{name} supports post_conv only")
        model = TorchvisionResNet(name, num_classes, in_channels, norm, dropout, norm_options)
    else:
        raise unknown("model", name, MODELS)
    return init_weights(model, init, **(init_options or {}))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODELS", "build_model", "count_parameters"]
