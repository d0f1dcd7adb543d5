"""The normalization layers behind `bnlab.norm.make_norm`, each written from its formula.

Notation for an input x of shape (N, C, *) (2d: (N, C, H, W); 1d: (N, C) or (N, C, L)): for each
channel c the statistics run over the m = N * prod(*) values x_i of that channel in the batch;
mean_B = (1/m) sum_i x_i, var_B = (1/m) sum_i (x_i - mean_B)^2 (biased), and the running variance
is updated with the unbiased m/(m-1) * var_B, as torch.nn.BatchNorm does.

Every layer computes its statistics in float32 (or float64 for float64 inputs), so under bf16
autocast the statistics and running buffers stay fp32; the output has the input's dtype.
Layers whose eval mode is exactly `gamma * (x - running_mean) / sqrt(running_var + eps) + beta`
subclass torch's `_BatchNorm`, so BN-folding and probing code that looks for BatchNorm modules
treats them correctly; the others (bn_posscale, bn_l2, bn_l2_sum, frozen) are plain modules.
Beware that nn.SyncBatchNorm.convert_sync_batchnorm converts every _BatchNorm, so multi-GPU code
must only convert the `bn` layers (or keep these norms per-GPU).

This module names every layer; batch_renorm, cumulative and ghost, which change which values a
training batch is normalized with, are written in batch_variants.py, and what the layers share
(the statistics' dimensions and dtype, the `_BatchStatNorm` base) in base.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.norm.base import (
    _BatchStatNorm,
    _compute_dtype,
    _dims,
    _shape,
    _values_per_channel,
)

# batch_renorm, cumulative and ghost are named here with the other layers (bnlab.norm.factory
# reads every layer from this module)
from bnlab.norm.batch_variants import (  # noqa: F401
    BatchRenorm,
    CumulativeNorm,
    GhostBatchNorm,
    cumulative_norm,
    renorm_limits,
)


# -- bn_ref -------------------------------------------------------------------------------------
class BatchNormFunction(torch.autograd.Function):
    """y = (x - mean_B) / sqrt(var_B + eps) * w + b, with the backward pass written out.

    With xhat = (x - mean_B) / sqrt(var_B + eps), g = dL/dy and sums over the m values of a
    channel:  dL/db = sum g,  dL/dw = sum g * xhat,
    dL/dx = w / sqrt(var_B + eps) * (g - (1/m) dL/db - xhat * (1/m) dL/dw).
    Returns (y, mean_B, var_B); the statistics are not differentiable outputs.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims, shape = _dims(x), _shape(x)
        mean = x.mean(dims)
        centered = x - mean.view(shape)
        var = (centered * centered).mean(dims)
        invstd = torch.rsqrt(var + eps)
        xhat = centered * invstd.view(shape)
        y = xhat * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar):
        xhat, invstd, weight = ctx.saved_tensors
        dims, shape = _dims(xhat), _shape(xhat)
        m = xhat.numel() // xhat.shape[1]
        gbias = gy.sum(dims)
        gweight = (gy * xhat).sum(dims)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (weight * invstd).view(shape) * (
                gy - (gbias / m).view(shape) - xhat * (gweight / m).view(shape))
        return (gx, gweight if ctx.needs_input_grad[1] else None,
                gbias if ctx.needs_input_grad[2] else None, None)


class ReferenceBatchNorm(_BatchStatNorm):
    """Batch normalization from the formulas (Ioffe & Szegedy 2015, Alg. 1 and 2).

    train: y = w * (x - mean_B) / sqrt(var_B + eps) + b  (BatchNormFunction, hand-written grad)
           running_mean <- (1 - momentum) running_mean + momentum mean_B
           running_var  <- (1 - momentum) running_var + momentum * m/(m-1) var_B
    eval:  y = w * (x - running_mean) / sqrt(running_var + eps) + b
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training or not self.track_running_stats):
            w, b = self._affine(x)
            xf, shape = x.to(_compute_dtype(x)), _shape(x)
            scale = w * torch.rsqrt(self.running_var + self.eps)
            return ((xf - self.running_mean.view(shape)) * scale.view(shape)
                    + b.view(shape)).to(x.dtype)
        m = _values_per_channel(x)
        w, b = self._affine(x)
        y, mean, var = BatchNormFunction.apply(x.to(_compute_dtype(x)), w, b, self.eps)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                f = self._momentum()
                self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_((var * m / (m - 1)).to(self.running_var.dtype),
                                                  alpha=f)
        return y.to(x.dtype)


# -- bn with Keras's conventions ------------------------------------------------------------------
class KerasBatchNorm(_BatchStatNorm):
    """keras.layers.BatchNormalization's arithmetic in PyTorch's layout and buffer names.

    Keras's `momentum` is the fraction of the moving statistic *kept* (default 0.99); PyTorch's
    is the fraction *replaced*, so `self.momentum = 1 - keras_momentum`. Keras updates the moving
    variance with the *biased* batch variance (PyTorch uses the unbiased one), default eps 1e-3:
    moving_mean <- k * moving_mean + (1 - k) * mean_B,
    moving_var <- k * moving_var + (1 - k) * var_B.
    """

    def __init__(self, num_features: int, momentum: float = 0.99, eps: float = 1e-3,
                 affine: bool = True):
        super().__init__(num_features, eps, 1.0 - momentum, affine, True)
        self.keras_momentum = momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self._eval(x)
        xf, w, b = self._train_inputs(x)
        y = F.batch_norm(xf, None, None, w, b, True, 0.0, self.eps)
        with torch.no_grad():
            dims = _dims(xf)
            mean = xf.mean(dims)
            var = xf.var(dims, unbiased=False)
            k = self.keras_momentum
            self.num_batches_tracked += 1
            self.running_mean.mul_(k).add_(mean.to(self.running_mean.dtype), alpha=1 - k)
            self.running_var.mul_(k).add_(var.to(self.running_var.dtype), alpha=1 - k)
        return y.to(x.dtype)


# -- bn_posscale ---------------------------------------------------------------------------------
class PositiveScaleBatchNorm(nn.Module):
    """BN whose scale is kept positive: y = softplus(rho) * xhat + beta, xhat as in BN.

    softplus rather than exp: its derivative sigmoid(rho) is at most 1, so a gradient step on rho
    moves the scale by at most the step itself (exp would make the step proportional to the
    scale, i.e. multiplicative, and let a large gradient blow the scale up). rho starts at
    softplus^-1(1) = log(e - 1), so the layer starts exactly as BN (scale 1, shift 0).
    Statistics and running buffers are BN's (torch convention, unbiased running variance).
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.momentum, self.eps = num_features, momentum, eps
        self.rho = nn.Parameter(torch.full((num_features,), math.log(math.e - 1.0)))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.rho)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_compute_dtype(x))
        return F.batch_norm(xf, self.running_mean, self.running_var, self.scale, self.bias,
                            self.training, self.momentum, self.eps).to(x.dtype)


# -- bn_l2 and bn_l2_sum -------------------------------------------------------------------------
class L2BatchNorm(nn.Module):
    """The seed study's BN: normalize, affine with a positive scale, then divide each channel
    by its batch L2 norm.

    train: z = a * (x - mean_B) / sqrt(var_B + eps) + beta,  a = softplus(rho) > 0
           y = z / sqrt(R(z^2) + eps),  over the m values of the channel in the batch:
             reduce="mean" (`bn_l2`):     R = (1/m) sum_i   (y has unit root-mean-square)
             reduce="sum"  (`bn_l2_sum`): R = sum_i         (the literal formula: y has root-
                                          mean-square 1/sqrt(m), so the output shrinks with the
                                          batch and the network is starved of signal)
    The two differ by the factor sqrt(m) alone. The denominator depends on the batch, so
    inference cannot recompute it from one image: a running average of the training
    denominators, running_denom <- (1 - momentum) running_denom + momentum sqrt(R(z^2) + eps),
    replaces it in eval mode, where z uses the running mean and variance. running_denom starts
    at 1; `a` starts at 1 (rho = log(e - 1)) as in bn_posscale. The eps under the root keeps y
    finite when a channel's z is all zero. mean_B, var_B and the running statistics are BN's
    (torch convention, unbiased running variance).
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5,
                 reduce: str = "mean"):
        super().__init__()
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        self.num_features, self.momentum, self.eps, self.reduce = (num_features, momentum, eps,
                                                                   reduce)
        self.rho = nn.Parameter(torch.full((num_features,), math.log(math.e - 1.0)))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("running_denom", torch.ones(num_features))

    @property
    def scale(self) -> torch.Tensor:
        return F.softplus(self.rho)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf, shape = x.to(_compute_dtype(x)), _shape(x)
        z = F.batch_norm(xf, self.running_mean, self.running_var, self.scale, self.bias,
                         self.training, self.momentum, self.eps)
        if not self.training:
            return (z / self.running_denom.view(shape)).to(x.dtype)
        sq = z * z
        r = sq.mean(_dims(z)) if self.reduce == "mean" else sq.sum(_dims(z))
        denom = torch.sqrt(r + self.eps)
        with torch.no_grad():
            self.running_denom.lerp_(denom.detach().to(self.running_denom.dtype), self.momentum)
        return (z / denom.view(shape)).to(x.dtype)


# -- frozen --------------------------------------------------------------------------------------
class FrozenBatchNorm(nn.Module):
    """BN with fixed statistics and affine (torchvision's FrozenBatchNorm2d semantics).

    y = weight * (x - running_mean) / sqrt(running_var + eps) + bias in train and eval mode; all
    four are buffers (nothing is learned or updated), initialized to 1, 0, 0, 1 and loadable
    from a BatchNorm state dict.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf, shape = x.to(_compute_dtype(x)), _shape(x)
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)


# -- group / layer / instance --------------------------------------------------------------------
class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm with fp32 statistics under autocast; per-sample, so train == eval.

    layer = 1 group (statistics over C and all spatial positions of one sample), instance = C
    groups (over the spatial positions of one channel of one sample); the affine is per channel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_compute_dtype(x))
        return F.group_norm(xf, self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)
