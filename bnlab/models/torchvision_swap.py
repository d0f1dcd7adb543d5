"""Any torchvision classification model, built without pretrained weights, with every
BatchNorm replaced by a norm of bnlab.norm (`--model torchvision:NAME --norm NORM`).

`swap_norms` is the one module walker that does the replacement (in the manner of timm's
`freeze_batch_norm_2d`): it visits every child, replaces each BatchNorm1d/2d by
`make_norm(norm, its channels)` in the same attribute, and leaves the rest alone. The new norm
takes over the model's own eps and momentum where it accepts those options and the user's
norm options do not set them, so `norm bn` gives torchvision's model exactly (MobileNetV3's
eps 1e-3 and momentum 0.01 included). A norm of 'none' becomes an nn.Identity in place.

In every family accepted here, the convolutions torchvision builds without a bias are exactly
those whose output a BatchNorm normalizes (directly, or after DenseNet's concatenation), so
when the new norm has no shift of its own (bnlab.norm.has_bias_substitute) each of them gets a
bias, initialized to 0.

Families are matched by name (FAMILIES). A family is refused when swapping its BatchNorms
would not answer what --norm asks: models that normalize with LayerNorm (ConvNeXt, ViT, Swin;
MaxViT mixes both), and models without any norm (AlexNet, VGG without _bn, SqueezeNet) for every
norm but 'none'. A name outside every family is refused as untested.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from bnlab.errors import UserError, suggest
from bnlab.models.norm_summary import swap_line
from bnlab.norm import OPTIONS, has_bias_substitute, make_norm

PREFIX = "torchvision:"
SWAPPED = (nn.BatchNorm1d, nn.BatchNorm2d)
WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class Family:
    name: str
    pattern: str  # regular expression a torchvision model name must match in full
    example: str  # its smallest member (the one the tests build)
    blocks: tuple[str, ...] = ()  # class names of its blocks: probes record their outputs
    refused: str = ""  # why no norm can be swapped into it ("" = accepted)
    has_bn: bool = True  # False: the family has no norm at all (accepted with norm none only)
    kwargs: tuple[tuple[str, object], ...] = ()  # builder arguments bnlab sets


LAYERNORM_ONLY = ("it normalizes with LayerNorm, not BatchNorm, so --norm has nothing to "
                  "replace")


FAMILIES = (
    Family("resnet", r"resnet\d+", "resnet18", ("BasicBlock", "Bottleneck")),
    Family("resnext", r"resnext\d+_\d+x\d+d", "resnext50_32x4d", ("Bottleneck",)),
    Family("wide_resnet", r"wide_resnet\d+_2", "wide_resnet50_2", ("Bottleneck",)),
    Family("densenet", r"densenet\d+", "densenet121", ("_DenseLayer",)),
    Family("mobilenet_v2", r"mobilenet_v2", "mobilenet_v2", ("InvertedResidual",)),
    Family("mobilenet_v3", r"mobilenet_v3_(small|large)", "mobilenet_v3_small",
           ("InvertedResidual",)),
    Family("mnasnet", r"mnasnet\d_\d+", "mnasnet0_5", ("_InvertedResidual",)),
    Family("shufflenet_v2", r"shufflenet_v2_x\d_\d", "shufflenet_v2_x0_5", ("InvertedResidual",)),
    Family("efficientnet", r"efficientnet_b\d", "efficientnet_b0", ("MBConv",)),
    Family("efficientnet_v2", r"efficientnet_v2_[sml]", "efficientnet_v2_s",
           ("MBConv", "FusedMBConv")),
    Family("regnet", r"regnet_[xy]_\w+", "regnet_x_400mf", ("ResBottleneckBlock",)),
    # the auxiliary classifiers return a tuple in training mode: bnlab trains the main head
    Family("googlenet", r"googlenet", "googlenet", ("Inception",),
           kwargs=(("aux_logits", False), ("init_weights", False))),
    Family("inception_v3", r"inception_v3", "inception_v3",
           ("InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE"),
           kwargs=(("aux_logits", False), ("init_weights", False))),
    Family("vgg_bn", r"vgg\d+_bn", "vgg11_bn"),
    Family("no_norm", r"alexnet|vgg\d+|squeezenet\d_\d", "squeezenet1_1", ("Fire",),
           has_bn=False),
    Family("convnext", r"convnext_\w+", "convnext_tiny",
           refused=LAYERNORM_ONLY),
    Family("vit", r"vit_\w+", "vit_b_32",
           refused=LAYERNORM_ONLY),
    Family("swin", r"swin_(v2_)?[tsb]", "swin_t",
           refused=LAYERNORM_ONLY),
    Family("maxvit", r"maxvit_t", "maxvit_t",
           refused="it normalizes its attention layers with LayerNorm, which --norm would "
                   "leave in place next to the swapped BatchNorms"),
)


def classification_models() -> list[str]:
    """The names of torchvision's classification models in this torchvision."""
    import torchvision  # on use: importing it takes a second or more (names.torchvision_blocks)

    return torchvision.models.list_models(module=torchvision.models)


def family_of(name: str) -> Family | None:
    return next((f for f in FAMILIES if re.fullmatch(f.pattern, name)), None)


def check_name(model: str) -> tuple[str, Family]:
    """('NAME', its family) of 'torchvision:NAME', or a one-line UserError saying why not."""
    name = model.removeprefix(PREFIX)
    known = classification_models()
    if name not in known:
        raise UserError(f"unknown torchvision classification model {name!r}"
                        f"{suggest(name, known)}; accepted: {', '.join(known)}")
    family = family_of(name)
    if family is None:
        raise UserError(f"{model} is in no model family bnlab has tested (families: "
                        f"{', '.join(f.name for f in FAMILIES if not f.refused)})")
    if family.refused:
        raise UserError(f"{model} is refused: {family.refused}")
    return name, family


def is_torchvision_name(model: str) -> bool:
    """True for 'torchvision:NAME' with NAME one of torchvision's classification models."""
    return model.startswith(PREFIX) and model[len(PREFIX):] in classification_models()


def _replacement(bn: nn.Module, norm: str, options: dict) -> nn.Module:
    accepted = OPTIONS[norm]
    keras = norm == "bn" and options.get("convention") == "keras"
    carried = {k: getattr(bn, k) for k in ("eps", "momentum")
               if k in accepted and k not in options and not keras
               and getattr(bn, k) is not None}
    new = make_norm(norm, bn.num_features, dim=2 if isinstance(bn, nn.BatchNorm2d) else 1,
                    **carried, **options)
    ref = next(itertools.chain(bn.parameters(), bn.buffers()), None)
    return new if ref is None else new.to(ref.device)


def swap_norms(module: nn.Module, norm: str, options: dict | None = None) -> nn.Module:
    """Replace every BatchNorm1d/2d inside `module` by `norm` (see the module docstring) and
    return `module` (or its replacement, when `module` itself is a BatchNorm)."""
    opts = dict(options or {})
    if isinstance(module, SWAPPED):
        return _replacement(module, norm, opts)
    for name, child in module.named_children():
        new = swap_norms(child, norm, opts)
        if new is not child:
            setattr(module, name, new)
    return module


def _build(name: str, num_classes: int, kwargs: dict) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                            **kwargs)
    except NotImplementedError:
        # RegNet computes its widths with tensor ops, which the meta device (used to find
        # layer names without allocating weights) cannot run: build on the CPU and move
        if torch.empty(0).device.type != "meta":
            raise
        with torch.device("cpu"):
            net = torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                               **kwargs)
        return net.to("meta")


def _replace(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, new)


class TorchvisionNet(nn.Module):
    """torchvision model NAME (no pretrained weights) with its BatchNorms swapped for `norm`,
    `in_channels` input channels and `num_classes` outputs; `dropout` > 0 adds a dropout layer
    before the last weight layer (the model's own dropout layers stay as torchvision has them).
    """

    def __init__(self, name: str, num_classes: int, in_channels: int = 3, norm: str = "bn",
                 dropout: float = 0.0, norm_options: dict | None = None):
        super().__init__()
        name, family = check_name(name if name.startswith(PREFIX) else PREFIX + name)
        opts = dict(norm_options or {})
        self.arch, self.family = PREFIX + name, family.name
        self.norm, self.norm_options = norm, opts
        if not family.has_bn and norm != "none":
            raise UserError(f"{self.arch} has no BatchNorm to replace by norm {norm!r}: it "
                            "takes norm none only (torchvision's vgg*_bn are the VGGs with BN)")
        self._blocks = family.blocks
        net = _build(name, num_classes, dict(family.kwargs))
        if in_channels != 3:
            first, conv = next((n, m) for n, m in net.named_modules()
                               if isinstance(m, nn.Conv2d))
            _replace(net, first, nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                device=conv.weight.device))
        before = Counter(type(m).__name__ for m in net.modules() if isinstance(m, SWAPPED))
        swap_norms(net, norm, opts)
        # logged once by the training run, with the options each layer resolved to
        self.swap_summary = swap_line(self.arch, dict(before), net, norm, opts)
        if has_bias_substitute(norm, opts):
            for m in net.modules():
                if isinstance(m, nn.Conv2d) and m.bias is None:
                    m.bias = nn.Parameter(torch.zeros(m.out_channels, device=m.weight.device))
        if dropout > 0:
            last = [n for n, m in net.named_modules() if isinstance(m, WEIGHT_LAYERS)][-1]
            _replace(net, last, nn.Sequential(nn.Dropout(dropout), net.get_submodule(last)))
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def classifier(self) -> nn.Module:
        """The last weight layer: the one that gives the logits."""
        return [m for m in self.net.modules() if isinstance(m, WEIGHT_LAYERS)][-1]

    def block_names(self) -> list[str]:
        """The family's blocks, whose outputs probes record as block outputs."""
        return [f"net.{n}" for n, m in self.net.named_modules()
                if type(m).__name__ in self._blocks]


def input_refusal(model: TorchvisionNet, in_channels: int, image_size: int) -> str | None:
    """Why `model` cannot take (N, in_channels, image_size, image_size) images, or why its norm
    would be meaningless on them (a group of one value per sample outputs its shift only);
    None when neither. Runs the forward pass on the meta device: shapes only, no arithmetic."""
    meta = {n: torch.empty_like(t, device="meta")
            for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    seen: dict[str, tuple] = {}

    def record(name: str, x: torch.Tensor) -> None:  # a pre-hook that returns None
        seen.setdefault(name, tuple(x.shape))

    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: record(n, args[0]))
             for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    was = model.training
    model.eval()
    try:
        x = torch.empty(2, in_channels, image_size, image_size, device="meta")
        torch.func.functional_call(model, meta, (x,))
    except (RuntimeError, ValueError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return f"{model.arch} cannot take {image_size} px images: {detail}"
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    for n, shape in seen.items():
        m = model.get_submodule(n)
        per_group = shape[1] // m.num_groups * (shape[2] * shape[3] if len(shape) == 4 else 1)
        if per_group == 1:
            return (f"norm {model.norm!r} would normalize single values at {n} of {model.arch} "
                    f"(input {'x'.join(map(str, shape[1:]))} on {image_size} px images) and "
                    "output only its shift: use larger images (image_size) or another norm")
    return None
