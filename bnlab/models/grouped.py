"""K copies of one architecture as one network: run k owns channel block k of every layer.

The packed input is the K runs' batches side by side along channels, (B, K*C, H, W). Every
convolution becomes a grouped convolution (groups = K * its own groups), so block k of its output
depends only on block k of its input and weights; batch norm over K*C channels computes each
channel's statistics over (B, H, W) exactly as the run's own BN(C) does; element-wise layers,
pooling and flattening act per channel; linear layers become K independent matrix products.
The packed network is therefore K independent networks that share kernel launches: the
gradient of sum_k loss_k with respect to run k's weights is the gradient of loss_k alone.

Every packed tensor stores run k's entries in slice k of `tensor.reshape(K, -1)`, so
`pack_state` / `unpack_state` convert between K single-run state dicts and the packed one.

Runs with and without batch norm can share a pack: their networks differ only in that a norm
layer of one is an identity in the other and that convolutions (and linear layers) without a
following norm carry a bias. The pack holds the union: a bias on every such layer (fixed at zero
for the runs that have none; `PackedSGD` leaves those entries alone) and, where only some runs
normalize, a `PartialBatchNorm` that passes the other runs' channels through unchanged
(`torch.where`, so their values and gradients are exactly those of an identity).

The scalar parameters of a residual branch (Fixup's four biases and multiplier, SkipInit's
multiplier: `BasicBlock.add_branch_scalars`) become one entry per run, a parameter of shape (K,)
under the same name; the block adds or multiplies entry k into channel block k
(`bnlab.models.cifar_resnet.per_run`). Runs without them hold the identity's values (bias 0,
multiplier 1: x + 0 and x * 1 are x exactly, in value and gradient) and never update them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.models.cifar_resnet import BRANCH_SCALARS, BasicBlock, CifarResNet, ShortcutA
from bnlab.models.mlp import MLP, Hidden
from bnlab.models.norm_act import FusedNormAct, NormAct
from bnlab.models.vgg import CifarVGG, ConvUnit

# modules that hold no parameters and act on each channel (or each feature) alone
STRUCTURAL = (nn.Sequential, nn.Identity, nn.ReLU, nn.MaxPool2d, CifarResNet, BasicBlock, MLP,
              Hidden, CifarVGG, ConvUnit, NormAct, FusedNormAct)


class NotPackable(ValueError):
    """A model contains a layer that has no packed form."""


class PackedLinear(nn.Module):
    """K independent linear maps: (B, K*in) -> (B, K*out); weight (K, out, in), bias (K, out)."""

    def __init__(self, k: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(k, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        out = torch.bmm(x.reshape(b, self.k, self.in_features).transpose(0, 1),
                        self.weight.transpose(1, 2)).transpose(0, 1)  # (B, K, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(b, self.k * self.out_features)


class PackedShortcutA(nn.Module):
    """Option-A shortcut of K runs: the zero channels are padded inside each run's block."""

    def __init__(self, k: int, stride: int, pad: int):
        super().__init__()
        self.k, self.stride, self.pad = k, stride, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            b, kc, h, w = x.shape
            cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            x = F.pad(x.reshape(b, self.k, kc // self.k, h, w),
                      (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            x = x.reshape(b, -1, h, w)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
        return x


class _PartialBatchNorm:
    """Batch norm over the channels of the runs that normalize; the other runs' channels
    (mask False) pass through unchanged. The statistics of those channels are computed and
    never used; their scale and shift stay at 1 and 0 (they receive no gradient)."""

    def _setup(self, mask: torch.Tensor) -> None:
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return torch.where(self.mask.view(shape), super().forward(x), x)


class PartialBatchNorm1d(_PartialBatchNorm, nn.BatchNorm1d):
    pass


class PartialBatchNorm2d(_PartialBatchNorm, nn.BatchNorm2d):
    pass


PARTIAL = {nn.BatchNorm1d: PartialBatchNorm1d, nn.BatchNorm2d: PartialBatchNorm2d}
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)  # the layers of PACKABLE_NORMS


def _packed_layer(m: nn.Module, k: int) -> nn.Module | None:
    """The packed replacement of one layer, None for a structural module kept as it is."""
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(k * m.in_channels, k * m.out_channels, m.kernel_size, m.stride,
                         m.padding, m.dilation, k * m.groups, m.bias is not None,
                         m.padding_mode)
    if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and type(m) in (nn.BatchNorm1d,
                                                                     nn.BatchNorm2d):
        return type(m)(k * m.num_features, m.eps, m.momentum, m.affine,
                       m.track_running_stats)
    if type(m) is nn.Linear:
        return PackedLinear(k, m.in_features, m.out_features, m.bias is not None)
    if type(m) is ShortcutA:
        return PackedShortcutA(k, m.stride, m.pad)
    if isinstance(m, nn.Dropout) and m.p == 0:
        return None
    if type(m) in STRUCTURAL:
        own = {n for n, _ in m.named_parameters(recurse=False)}
        if type(m) is BasicBlock and own <= set(BRANCH_SCALARS):
            return None  # its branch scalars become per-run vectors (_add_branch_scalars)
        if own or list(m.buffers(recurse=False)):
            names = [n for n, _ in m.named_parameters(recurse=False)]
            raise NotPackable(f"{type(m).__name__} holds its own parameters "
                              f"({', '.join(names) or 'buffers'}), which have no packed form")
        return None
    raise NotPackable(f"layer {type(m).__name__} has no packed form")


def check_packable(model: nn.Module) -> None:
    """Raise NotPackable naming the first layer that cannot be packed."""
    for _, m in model.named_modules():
        _packed_layer(m, 1)


def _union_layer(layers: list[nn.Module], k: int) -> nn.Module | None:
    """The packed layer for one position of K networks that may differ in norm (a batch norm
    in some, an identity in others) and, for convolutions and linear layers, in having a bias."""
    first = layers[0]
    # the norm-ReLU step is torch's or the fused one per network (a network without a
    # BatchNorm keeps torch's): one kind here, the pack keeping its base network's
    kinds = {NormAct if type(m) is FusedNormAct else type(m) for m in layers}
    norms = [m for m in layers if type(m) in NORM_TYPES]
    if norms and len(norms) < len(layers):
        if kinds - {type(norms[0]), nn.Identity}:
            raise NotPackable("a norm layer faces a layer other than an identity in another run")
        bn = norms[0]
        mask = torch.tensor([type(m) in NORM_TYPES for m in layers]).repeat_interleave(
            bn.num_features)
        layer = PARTIAL[type(bn)](k * bn.num_features, bn.eps, bn.momentum, bn.affine,
                                  bn.track_running_stats)
        layer._setup(mask)
        return layer
    if len(kinds) > 1:
        names = ", ".join(sorted(t.__name__ for t in kinds))
        raise NotPackable(f"the runs differ in layer types ({names})")
    if isinstance(first, BasicBlock):
        for m in layers:
            _packed_layer(m, k)  # refuses parameters other than the branch scalars
        return None
    if isinstance(first, nn.Conv2d | nn.Linear) and any(m.bias is not None for m in layers):
        if first.bias is None:
            first = next(m for m in layers if m.bias is not None)
    return _packed_layer(first, k)


def empty_pack(models: nn.Module | list[nn.Module], k: int | None = None) -> nn.Module:
    """The packed form for k runs of `model` (or of the K `models`, which may differ in norm
    as the module docstring says); its parameters are still to be loaded."""
    models = [models] * (k or 1) if isinstance(models, nn.Module) else list(models)
    k = len(models)
    base = next((m for m in models if any(type(x) in NORM_TYPES for x in m.modules())), models[0])
    packed = copy.deepcopy(base)
    others = [dict(m.named_modules()) for m in models]
    for name, m in list(packed.named_modules()):
        layers = [o.get(name) for o in others]
        if any(x is None for x in layers):
            raise NotPackable(f"layer {name!r} is missing in one of the runs")
        new = _union_layer(layers, k)
        if isinstance(m, BasicBlock):
            _add_branch_scalars(m, layers, k)
        if new is not None:
            ref = next(iter(m.parameters(recurse=False)), None)
            if ref is not None:
                new = new.to(device=ref.device, dtype=ref.dtype)
            packed.set_submodule(name, new)
    return packed


def _add_branch_scalars(block: BasicBlock, layers: list[nn.Module], k: int) -> None:
    """Give the packed `block` one entry per run of every branch scalar any run has (values
    loaded later by pack_state; runs without it get the identity's, identity_fill)."""
    ref = block.conv1.weight
    for name in BRANCH_SCALARS:
        if any(getattr(m, name) is not None for m in layers):
            setattr(block, name, nn.Parameter(torch.zeros(k, device=ref.device,
                                                          dtype=ref.dtype)))


def pack_models(models: list[nn.Module]) -> nn.Module:
    """One packed network holding the K given models' parameters and buffers."""
    packed = empty_pack(models)
    packed.load_state_dict(pack_state([m.state_dict() for m in models], packed.state_dict()))
    return packed


def identity_fill(key: str, ref: torch.Tensor) -> torch.Tensor:
    """A run's entries for a state key its own network lacks: a norm layer it does not have
    (scale and running variance 1, shift and running mean 0), a bias it does not have (0), or
    a branch scalar it does not have (multiplier 1, biases 0)."""
    # every conv/linear weight exists in all runs
    one = key.endswith(("weight", "running_var", ".scale"))
    return torch.ones_like(ref) if one else torch.zeros_like(ref)


def zero_fill(key: str, ref: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(ref)


def pack_state(states: list[dict], like: dict, fill=identity_fill) -> dict:
    """Stack K single-run state dicts into the layout of the packed state dict `like`; a key
    missing from a run's dict (mixed norms) gets `fill(key, other run's tensor)`."""
    out = {}
    for key, ref in like.items():
        have = [s[key] for s in states if key in s]
        if key.endswith("num_batches_tracked"):
            out[key] = have[0].clone()  # one count: every packed run takes the same steps
        else:
            parts = [s[key] if key in s else fill(key, have[0]) for s in states]
            out[key] = torch.stack(parts).reshape(ref.shape)
    return out


def owned_entries(models: list[nn.Module], packed: nn.Module) -> dict[str, list[bool]]:
    """Per packed parameter, which runs have it in their own network (False: a bias or norm
    parameter the pack holds only for the other runs, to be left unchanged)."""
    names = [{n for n, _ in m.named_parameters()} for m in models]
    return {n: [n in own for own in names] for n, _ in packed.named_parameters()}


def unpack_state(packed: dict, k: int, n: int, like: dict) -> dict:
    """Run k's state dict (of n packed runs), shaped like the single-run state dict `like`."""
    out = {}
    for key, ref in like.items():
        t = packed[key]
        if key.endswith("num_batches_tracked"):
            out[key] = t.detach().clone()
        else:
            out[key] = t.detach().reshape(n, -1)[k].reshape(ref.shape).clone()
    return out
