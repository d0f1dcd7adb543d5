"""Models by name: `build_model(name, num_classes, norm=..., init=..., in_channels=...)`, and
`build_for(cfg, bundle)`, the model of a run config on its data."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from bnlab.config import RunConfig
from bnlab.errors import UserError, unknown
from bnlab.models.cifar_resnet import CifarResNet
from bnlab.models.entry import build_entry_model
from bnlab.models.init import init_weights
from bnlab.models.mlp import MLP
from bnlab.models.names import DEPTHS, PLAIN_DEPTHS
from bnlab.models.names import VGG_CONFIGS as CONFIGS
from bnlab.models.names import VGG_LETTERS as LETTERS
from bnlab.models.norm_act import use_fused_norm_act
from bnlab.models.torchvision_swap import (
    FAMILIES,
    PREFIX,
    TorchvisionNet,
    classification_models,
    family_of,
    input_refusal,
    is_torchvision_name,
)
from bnlab.models.vgg import CifarVGG
from bnlab.norm import make_norm, norm_spec
from bnlab.usercode import ENTRY, first_line

if TYPE_CHECKING:  # a type only: models do not depend on the data package
    from bnlab.data.bundle import DataBundle


class ModelNames(dict):
    """name -> description; `in` also accepts 'torchvision:NAME' for every torchvision
    classification model and every 'entry:MODULE:FUNCTION' (checked when it is built), which
    the listing shows as one entry each."""

    def __contains__(self, name) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and (
            is_torchvision_name(name) or name.startswith(ENTRY)))


MODELS = ModelNames({
    **{name: f"CIFAR ResNet-{d} (He et al. 2016, sec. 4.2)" for name, d in DEPTHS.items()},
    **{name: f"CIFAR plain-{d}: ResNet-{d} without shortcuts (He et al. 2016, Fig. 6)"
       for name, d in PLAIN_DEPTHS.items()},
    **{name: f"CIFAR VGG-{name[3:]} (configuration {LETTERS[name]} of Simonyan & Zisserman "
             "2015, one linear classifier)" for name in CONFIGS},
    "mlp3x100": "Ioffe & Szegedy 2015 Fig. 1: 3 hidden layers of 100 sigmoid units",
    "resnet18": "torchvision ResNet-18 (ImageNet-style data)",
    "resnet50": "torchvision ResNet-50 (ImageNet-style data)",
    f"{PREFIX}NAME": "a torchvision classification model, its BatchNorms swapped for --norm "
                     "(the families `bnlab models` lists)",
    f"{ENTRY}MODULE:FUNCTION": "your own network: FUNCTION(num_classes, norm) returns an "
                               "nn.Module whose norm layers are norm(channels) (docs/models.md)",
})
PLACEMENT_MODELS = (*DEPTHS, *PLAIN_DEPTHS, *CONFIGS)  # the models that take every placement


def family_lines() -> list[tuple[str, str]]:
    """(family, what bnlab does with it: its members) for `bnlab models`."""
    names = classification_models()
    out = []
    for f in FAMILIES:
        what = (f"refused ({f.refused})" if f.refused else "norm none only (it has no norm)"
                if not f.has_bn else "BatchNorms swapped")
        members = [n for n in names if family_of(n) is f]
        out.append((f.name, f"{what}: {', '.join(members)}"))
    return out


def build_model(name: str, num_classes: int, norm: str = "bn", init: str = "kaiming",
                in_channels: int = 3, image_size: int = 32, placement: str = "post_conv",
                first_k: int = 1, dropout: float = 0.0, norm_options: dict | None = None,
                init_options: dict | None = None, cpu_kernels: bool = False) -> nn.Module:
    """Build and initialize a model; the norm and init are chosen by name. An entry: model is
    built by its own function (bnlab.models.entry), which initializes it; placement, first_k,
    dropout and init are refused for it by the run config (bnlab.config). cpu_kernels=True
    runs each norm-ReLU(-add) step of bnlab's own models with the fused CPU kernel where it can
    be built (bnlab.models.norm_act); the model's parameters and initialization are the same."""
    if name.startswith(ENTRY):
        return build_entry_model(name, num_classes, norm, norm_options, in_channels, image_size)
    if name in DEPTHS or name in PLAIN_DEPTHS:
        depth = DEPTHS.get(name) or PLAIN_DEPTHS[name]
        model = CifarResNet(depth, num_classes, in_channels, norm, placement, first_k,
                            dropout, norm_options, shortcuts=name in DEPTHS)
    elif name in CONFIGS:
        model = CifarVGG(name, num_classes, in_channels, norm, placement, first_k, dropout,
                         norm_options, image_size)
    elif name == "mlp3x100":
        if placement != "post_conv":
            raise UserError(f"placement {placement!r} applies to the CIFAR ResNets, plain nets "
                            "and VGGs; mlp3x100 puts the norm before each sigmoid (use "
                            "post_conv)")
        model = MLP(in_channels * image_size * image_size, num_classes, 100, 3, norm, dropout,
                    norm_options)
    elif name in ("resnet18", "resnet50") or name.startswith(PREFIX):
        if placement != "post_conv":
            raise UserError(f"placement {placement!r} is implemented for the CIFAR ResNets, "
                            f"plain nets and VGGs; {name} supports post_conv only (its norms "
                            "sit where torchvision puts its BatchNorms)")
        model = TorchvisionNet(name, num_classes, in_channels, norm, dropout, norm_options)
    else:
        raise unknown("model", name, MODELS)
    model = init_weights(model, init, **(init_options or {}))
    if cpu_kernels:
        use_fused_norm_act(model)
    return model


def build_for(cfg: RunConfig, bundle: DataBundle, cpu_kernels: bool = False) -> nn.Module:
    """The model of run config `cfg` for the data of `bundle` (its classes, channels, size);
    `cpu_kernels` as in build_model (a run passes cfg.cpu_kernels on the CPU)."""
    if cfg.model.startswith(ENTRY):
        model = build_entry_model(cfg.model, bundle.num_classes, cfg.norm, cfg.norm_options,
                                  bundle.in_channels, bundle.image_size, cfg.model_source)
        _check_logits(model, cfg.model, bundle)
        return model
    model = build_model(cfg.model, bundle.num_classes, norm=cfg.norm, init=cfg.init,
                        in_channels=bundle.in_channels, image_size=bundle.image_size,
                        placement=cfg.placement, first_k=cfg.first_k, dropout=cfg.dropout,
                        norm_options=cfg.norm_options, init_options=cfg.init_options,
                        cpu_kernels=cpu_kernels)
    if isinstance(model, TorchvisionNet):
        why = input_refusal(model, bundle.in_channels, bundle.image_size)
        if why:
            raise UserError(why)
    if isinstance(model, MLP) and not _trains_on_its_batch(cfg):
        if cfg.batch_size == 1:
            raise UserError(f"norm {cfg.norm!r} normalizes each feature with batch statistics, "
                            f"which a batch of 1 does not have on {cfg.model}: use batch_size "
                            ">= 2, or a norm without batch statistics (e.g. layer, none)")
        raise UserError(f"norm {cfg.norm!r} with options {cfg.norm_options} cuts a batch of "
                        f"{cfg.batch_size} into virtual batches one of which holds a single "
                        f"example, which has no batch statistics on {cfg.model}: use a batch "
                        "size that leaves every virtual batch 2 or more examples (an even one "
                        "for virtual_batch_size 2)")
    return model


def _check_logits(model: nn.Module, name: str, bundle: DataBundle) -> None:
    """Two blank images of the run's data through the model (evaluation mode, no gradient, RNG
    state kept): refuse, in one line, a model that fails on them or does not return logits of
    shape (2, classes), before a run folder exists."""
    x = torch.zeros(2, bundle.in_channels, bundle.image_size, bundle.image_size)
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model.eval()(x)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the user's forward raises
        raise UserError(f"model {name!r} fails on images of dataset {bundle.name!r} (shape "
                        f"{tuple(x.shape)}): {first_line(e)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, bundle.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model {name!r} returns {shape} for 2 images of dataset "
                        f"{bundle.name!r}; it needs logits of shape (2, {bundle.num_classes})")


def _trains_on_its_batch(cfg: RunConfig) -> bool:
    """Whether the norm of `cfg`, on (N, C) features, takes a training step on a batch of
    cfg.batch_size (a per-feature batch statistic of one value, from a batch or a virtual batch
    of one example, is refused by torch and by bnlab's norms); tried on a small separate layer,
    so the run's model is left untouched."""
    if not norm_spec(cfg.norm).batch_stats:
        return True
    probe = make_norm(cfg.norm, 4, dim=1, **cfg.norm_options).train()
    try:
        probe(torch.zeros(cfg.batch_size, 4))
    except ValueError:
        return False
    return True


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
