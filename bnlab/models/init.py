"""Weight initializations by name, applied to a built model.

`init_weights(model, name, **options)` first checks that the scheme makes sense for the model
and its norm (a one-line UserError naming the reason otherwise), then initializes in place.
Norm layers keep their own initialization (scale 1, shift 0) unless the scheme says otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bnlab.errors import UserError, unknown
from bnlab.models.cifar_resnet import BasicBlock, CifarResNet
from bnlab.models.names import torchvision_blocks
from bnlab.models.vgg import CifarVGG
from bnlab.norm import zero_scale_, zero_scale_refusal
from bnlab.values import check_options

INITS = {
    "kaiming": "He et al. 2015 (MSRA): conv/linear weights ~ N(0, 2/fan), fan = fan_in "
               "(option mode=fan_out), biases 0",
    "xavier": "Glorot & Bengio 2010: weights ~ U(-a, a), a = gain * sqrt(6/(fan_in+fan_out)), "
              "biases 0",
    "orthogonal": "Saxe et al. 2014: each weight reshaped to (out, in*k*k) is gain * a random "
                  "(semi-)orthogonal matrix, biases 0",
    "normal": "conv/linear weights ~ N(0, std^2) (option std), biases 0: the \"small random "
              "Gaussian values\" of Ioffe & Szegedy 2015, Sec. 4.1",
    "fixup": "Zhang et al. 2019: kaiming, then the convs of each residual branch but the last "
             "times L^(-1/(2m-2)) (L blocks, m convs per branch: 2, or 3 in ResNet-50's "
             "bottlenecks), the branch's last conv and the classifier 0, scalar biases 0 and a "
             "scalar multiplier 1 per branch (norm none only)",
    "zero_residual": "kaiming, then the scale of the last norm of every residual branch 0 "
                     "(Goyal et al. 2017)",
    "skipinit": "De & Smith 2020: kaiming, then a learnable scalar multiplier, 0 at start, on "
                "every residual branch",
}
OPTIONS = {"kaiming": {"mode": "fan_in"}, "xavier": {"gain": 1.0},
           "orthogonal": {"gain": 1.0}, "normal": {"std": 0.01}, "fixup": {"mode": "fan_in"},
           "zero_residual": {"mode": "fan_in"}, "skipinit": {"mode": "fan_in"}}
BRANCH_LAYERS = 2  # m: weight layers per residual branch of the CIFAR BasicBlock


def fixup_scale(num_blocks: int, layers_per_branch: int = BRANCH_LAYERS) -> float:
    """Fixup's factor L^(-1/(2m-2)) for the weights inside L residual branches of m layers."""
    return num_blocks ** (-1.0 / (2 * layers_per_branch - 2))


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The CIFAR ResNet blocks with a shortcut (a plain net's blocks have none)."""
    return [m for m in model.modules() if isinstance(m, BasicBlock) and m.residual]


def _tv_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = torchvision_blocks()
    return [m for m in model.modules() if blocks and isinstance(m, blocks)]


def refusal(model: nn.Module, name: str) -> str | None:
    """Why the scheme `name` makes no sense for `model` (None when it does)."""
    if name not in ("fixup", "zero_residual", "skipinit"):
        return None
    kind = getattr(model, "arch", type(model).__name__)
    blocks = residual_blocks(model)
    if isinstance(model, CifarVGG) or (isinstance(model, CifarResNet) and not blocks):
        return (f"init {name!r} acts on residual branches (it scales or zeroes each branch's "
                f"last layer) and {kind} has none: it has no shortcuts, so a zeroed layer "
                "would cut the signal")
    if name == "skipinit" and not blocks:
        return (f"init {name!r} is implemented for the residual blocks of the CIFAR ResNets, "
                f"not for {kind}")
    if name == "fixup" and not blocks and not _tv_blocks(model):
        return (f"init {name!r} is implemented for the residual blocks of the CIFAR ResNets "
                f"and of torchvision's ResNet, ResNeXt and Wide ResNet families, not for {kind}")
    if name == "fixup":
        if model.norm != "none":
            return (f"init 'fixup' is for networks without normalization (norm none), got norm "
                    f"{model.norm!r}: a norm after the zeroed conv divides 0 by sqrt(eps)")
        return None
    if name == "zero_residual":
        tv = _tv_blocks(model)
        if not blocks and not tv:
            return f"init 'zero_residual' needs residual blocks; {kind} has none"
        for b in blocks or [model]:
            why = zero_scale_refusal(b.norm, b.norm_options)
            if why and b.norm == "none" and model.norm != "none":
                return ("init 'zero_residual' needs a norm at the end of every residual branch; "
                        "placement first_k leaves the blocks after the first k without one")
            if why:
                return f"init 'zero_residual' sets the last norm's scale to 0, but {why}"
    return None


def init_weights(model: nn.Module, name: str = "kaiming", **options) -> nn.Module:
    """Initialize `model` in place with the scheme `name` (see INITS) and return it."""
    if name not in INITS:
        raise unknown("init", name, INITS)
    check_options(f"init {name!r}", options, OPTIONS[name])  # known, each of its type
    why = refusal(model, name)
    if why:
        raise UserError(why)
    o = {**OPTIONS[name], **options}
    if name in ("xavier", "orthogonal") and not o["gain"] > 0:
        # gain 0 would zero every weight (no signal, no gradient); a negative gain is refused
        # by torch's uniform_ in the middle of building the model
        raise UserError(f"init option gain must be a number > 0, got {o['gain']!r}")
    if name == "xavier":
        _init_layers(model, lambda w: nn.init.xavier_uniform_(w, gain=float(o["gain"])))
        return model
    if name == "orthogonal":
        _init_layers(model, lambda w: nn.init.orthogonal_(w, gain=float(o["gain"])))
        return model
    if name == "normal":
        std = o["std"]
        if isinstance(std, bool) or not isinstance(std, int | float) or not 0 < std < math.inf:
            raise UserError(f"init option std must be a number > 0, got {std!r}")
        _init_layers(model, lambda w: nn.init.normal_(w, 0.0, float(std)))
        return model
    if o["mode"] not in ("fan_in", "fan_out"):
        raise UserError(f"init option mode must be fan_in or fan_out, got {o['mode']!r}")
    _init_layers(model, lambda w: nn.init.kaiming_normal_(w, mode=o["mode"],
                                                          nonlinearity="relu"))
    if name == "fixup":
        _fixup(model)
    elif name == "zero_residual":
        for b in residual_blocks(model):
            zero_scale_(b.n2)
        for b in _tv_blocks(model):
            zero_scale_(b.bn3 if hasattr(b, "bn3") else b.bn2)
    elif name == "skipinit":
        for b in residual_blocks(model):
            b.add_branch_scalars(biases=False, scale=0.0)
    return model


def _init_layers(model: nn.Module, fill) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            fill(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def _fixup(model: nn.Module) -> None:
    if not residual_blocks(model):  # torchvision's blocks: m = 2 (BasicBlock) or 3 (Bottleneck)
        from bnlab.models.imagenet import fixup_torchvision  # loads torchvision
        fixup_torchvision(model)
        return
    blocks = residual_blocks(model)
    scale = fixup_scale(len(blocks))
    for b in blocks:
        b.conv1.weight.mul_(scale)
        b.conv2.weight.zero_()
        b.add_branch_scalars(biases=True, scale=1.0)
    fc = model.classifier
    fc.weight.zero_()
    fc.bias.zero_()


__all__ = ["INITS", "fixup_scale", "init_weights", "refusal", "residual_blocks"]
