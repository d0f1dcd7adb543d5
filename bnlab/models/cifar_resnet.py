"""CIFAR ResNets of He et al. 2016, section 4.2: 6n+2 layers, stages of 16/32/64 channels, and
their plain counterparts (the same layers without shortcuts, the "plain-20/32/44/56" of the
paper's Fig. 6).

Shortcuts are parameter-free (option A: subsample by 2 and pad the new channels with zeros) in
every placement, so the only parameters that change with the norm are the norms' own and the
conv biases that replace them, and a plain net has exactly the parameters of its ResNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.config import PLACEMENTS
from bnlab.errors import UserError, unknown
from bnlab.models.norm_act import NormAct
from bnlab.norm import has_bias_substitute, make_norm


class _SubsamplePad(torch.autograd.Function):
    """x[:, :, ::s, ::s] with (lo, hi) zero channels around it, in x's memory format.

    The same values as slicing then F.pad, but both passes keep channels_last: F.pad's backward
    builds the input's gradient in NCHW, which then costs a transposing copy where it meets the
    channels_last gradients of the other branch."""

    @staticmethod
    def forward(ctx, x, stride, lo, hi):
        fmt = (torch.channels_last if x.dim() == 4 and x.is_contiguous(
            memory_format=torch.channels_last) else torch.contiguous_format)
        sub = x[:, :, ::stride, ::stride]
        n, c, h, w = sub.shape
        out = torch.empty((n, lo + c + hi, h, w), dtype=x.dtype, device=x.device,
                          memory_format=fmt)
        out[:, :lo].zero_()
        out[:, lo + c:].zero_()
        out[:, lo:lo + c].copy_(sub)
        ctx.geometry = (x.shape, fmt, stride, lo, c)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        shape, fmt, stride, lo, c = ctx.geometry
        gx = torch.empty(shape, dtype=g.dtype, device=g.device, memory_format=fmt).zero_()
        gx[:, :, ::stride, ::stride].copy_(g[:, lo:lo + c])
        return gx, None, None, None


class ShortcutA(nn.Module):
    """Identity, or stride-2 subsampling with zero-padded channels when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CPU only (not under FX tracing): the GPU path stays the one measured in docs/speed.md
        if ((self.stride > 1 or self.pad) and not isinstance(x, torch.fx.Proxy)
                and x.device.type == "cpu"
                and x.requires_grad and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
            return _SubsamplePad.apply(x, self.stride, self.pad // 2, self.pad - self.pad // 2)
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


BRANCH_SCALARS = ("bias1a", "bias1b", "bias2a", "bias2b", "scale")  # add_branch_scalars


def per_run(p: nn.Parameter, x: torch.Tensor) -> torch.Tensor:
    """A branch scalar shaped to act on x: as it is for one run (shape (1,)); for the K runs of
    a pack (shape (K,), bnlab.models.grouped) entry k repeated over run k's channel block. In
    x's dtype: under bf16 autocast an fp32 scalar would promote the whole activation to fp32
    (a (1,) tensor takes part in type promotion), and every conv after it would cast it back."""
    p = p.to(x.dtype)
    if p.numel() == 1:
        return p
    return p.repeat_interleave(x.shape[1] // p.numel()).view(1, -1, *([1] * (x.ndim - 2)))


def _maybe_add(p: nn.Parameter | None, x: torch.Tensor) -> torch.Tensor:
    return x if p is None else x + per_run(p, x)


class BasicBlock(nn.Module):
    """Two 3x3 convs on a residual branch, added to a parameter-free shortcut (without it when
    `shortcut=False`: the block of a plain net, out = the branch, with the same ReLU after it).

    placement 'post_conv': out = relu(n2(conv2(relu(n1(conv1(x))))) + shortcut(x))
    placement 'post_act':  out = n2(relu(conv2(n1(relu(conv1(x)))))) + shortcut(x)
    In both, the block's last norm ends its branch, so the trunk between blocks carries no norm
    (a norm after the addition would normalize the shortcut path too, and a zero scale there
    would cut the whole network off instead of only the branch). In post_act every conv is
    followed by ReLU then norm, so the ReLU that post_conv applies after the addition sits on
    the branch before n2.
    The scalar parameters (`bias1a` ... `scale`) exist only after `add_branch_scalars`, used by
    the Fixup and SkipInit initializations; a norm of 'none' is an nn.Identity kept in place so
    that probes find the same positions in every variant. In post_conv each norm, its ReLU (and
    the add) are one step, `act1`/`act2` (bnlab.models.norm_act), which a model built with the
    fused CPU kernels runs as one kernel.
    """

    def __init__(self, cin: int, cout: int, stride: int, norm: str, placement: str,
                 norm_options: dict, shortcut: bool = True):
        super().__init__()
        bias = has_bias_substitute(norm, norm_options)
        self.placement, self.norm, self.norm_options = placement, norm, norm_options
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
        self.n1 = make_norm(norm, cout, **norm_options)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=bias)
        self.n2 = make_norm(norm, cout, **norm_options)
        self.shortcut = ShortcutA(cin, cout, stride) if shortcut else None
        self.act1, self.act2 = NormAct(), NormAct()
        self.bias1a = self.bias1b = self.bias2a = self.bias2b = self.scale = None

    @property
    def residual(self) -> bool:
        return self.shortcut is not None

    def add_branch_scalars(self, biases: bool, scale: float) -> None:
        """Add a learnable scalar multiplier on the branch (and Fixup's four scalar biases)."""
        dev = self.conv1.weight.device
        if biases:
            for name in BRANCH_SCALARS[:4]:
                setattr(self, name, nn.Parameter(torch.zeros(1, device=dev)))
        self.scale = nn.Parameter(torch.full((1,), float(scale), device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "post_act":
            out = self.conv1(_maybe_add(self.bias1a, x))
            out = self.n1(F.relu(_maybe_add(self.bias1b, out)))
            out = self._scaled(self.n2(F.relu(self.conv2(_maybe_add(self.bias2a, out)))))
            return self._add_shortcut(out, x)
        out = self.conv1(_maybe_add(self.bias1a, x))
        # Fixup's bias1b is added between n1 and its ReLU: the step's residual, shaped per run
        out = self.act1(self.n1, out, None if self.bias1b is None else per_run(self.bias1b, out))
        out = self.conv2(_maybe_add(self.bias2a, out))
        if self.scale is None:
            return self.act2(self.n2, out, None if self.shortcut is None else self.shortcut(x))
        # the branch's scalars sit between its last norm and the add
        return F.relu(self._add_shortcut(self._scaled(self.n2(out)), x))

    def _add_shortcut(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return out if self.shortcut is None else out + self.shortcut(x)

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            out = out * per_run(self.scale, out)
        return _maybe_add(self.bias2b, out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32 px images; with `shortcuts=False` its plain counterpart."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3,
                 norm: str = "bn", placement: str = "post_conv", first_k: int = 1,
                 dropout: float = 0.0, norm_options: dict | None = None,
                 shortcuts: bool = True):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.arch = f"{'resnet' if shortcuts else 'plain'}{depth}"
        if placement not in PLACEMENTS:
            raise unknown("placement", placement, PLACEMENTS)
        if placement == "first_k" and not 0 <= first_k <= 3 * n:
            raise UserError(f"first_k must be between 0 and {3 * n} (the blocks of "
                            f"{self.arch}), got {first_k}")
        opts = dict(norm_options or {})
        self.placement, self.norm, self.norm_options = placement, norm, opts
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=has_bias_substitute(norm, opts))
        self.n1 = make_norm(norm, 16, **opts)
        self.act1 = NormAct()
        blocks, cin, index = [], 16, 0
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                block_norm = norm
                if placement == "first_k" and index >= first_k:
                    block_norm = "none"
                blocks.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1,
                                         block_norm, "post_act" if placement == "post_act"
                                         else "post_conv", opts if block_norm == norm else {},
                                         shortcuts))
                cin, index = cout, index + 1
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "post_act":
            x = self.n1(F.relu(self.conv1(x)))
        else:
            x = self.act1(self.n1, self.conv1(x))
        x = self.blocks(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(self.dropout(x))

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def block_names(self) -> list[str]:
        """The modules whose outputs probes record as block outputs."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]
