"""Models by name: `build_model(name, num_classes, norm=..., init=..., in_channels=...)`, and
`build_for(cfg, bundle)`, the model of a run config on its data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from bnlab.config import RunConfig
from bnlab.errors import UserError, unknown
from bnlab.models.cifar_resnet import DEPTHS, CifarResNet
from bnlab.models.imagenet import TorchvisionResNet
from bnlab.models.init import init_weights
from bnlab.models.mlp import MLP

if TYPE_CHECKING:  # a type only: models do not depend on the data package
    from bnlab.data.bundle import DataBundle

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


def build_for(cfg: RunConfig, bundle: DataBundle) -> nn.Module:
    """The model of run config `cfg` for the data of `bundle` (its classes, channels, size)."""
    return build_model(cfg.model, bundle.num_classes, norm=cfg.norm, init=cfg.init,
                       in_channels=bundle.in_channels, image_size=bundle.image_size,
                       placement=cfg.placement, first_k=cfg.first_k, dropout=cfg.dropout,
                       norm_options=cfg.norm_options, init_options=cfg.init_options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
