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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _dims(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def _shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _values_per_channel(x: torch.Tensor) -> int:
    m = x.numel() // x.shape[1]
    if m < 2:
        raise ValueError(f"batch statistics need more than 1 value per channel, got input "
                         f"shape {tuple(x.shape)}")
    return m


class _BatchStatNorm(_BatchNorm):
    """Shared base: BatchNorm buffers and parameters, any input of rank >= 2."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, ...), got {tuple(x.shape)}")

    def _affine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[1]
        w = self.weight if self.weight is not None else x.new_ones(c)
        b = self.bias if self.bias is not None else x.new_zeros(c)
        return w, b

    def _momentum(self) -> float:
        """torch's convention: the fraction of the new batch statistic (None = 1/steps)."""
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _eval(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._affine(x)
        xf = x.to(_compute_dtype(x))
        return F.batch_norm(xf, self.running_mean, self.running_var, w, b, False, 0.0,
                            self.eps).to(x.dtype)

    def _train_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                       torch.Tensor]:
        """(x in the compute dtype, scale, shift) for a training-mode forward, after checking
        that every channel has more than one value."""
        _values_per_channel(x)
        return (x.to(_compute_dtype(x)), *self._affine(x))


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


# -- batch_renorm --------------------------------------------------------------------------------
def renorm_limits(step: int, rmax: float, dmax: float, warmup_steps: int, rmax_ramp_steps: int,
                  dmax_ramp_steps: int) -> tuple[float, float]:
    """(r_max, d_max) at training step `step` (0-based): (1, 0) during the warm-up, then each
    grows linearly to its final value over its ramp (Ioffe 2017: 1 and 0 for 5k steps, r_max
    reaches 3 at 40k steps and d_max 5 at 25k)."""
    if step < warmup_steps:
        return 1.0, 0.0
    t = step - warmup_steps
    fr = min(1.0, t / rmax_ramp_steps) if rmax_ramp_steps > 0 else 1.0
    fd = min(1.0, t / dmax_ramp_steps) if dmax_ramp_steps > 0 else 1.0
    return 1.0 + (rmax - 1.0) * fr, dmax * fd


class BatchRenorm(_BatchStatNorm):
    """Batch Renormalization (Ioffe 2017, Algorithm 1).

    train: sigma_B = sqrt(var_B + eps), sigma = sqrt(running_var + eps),
           r = clip(sigma_B / sigma, 1/r_max, r_max),
           d = clip((mean_B - mu) / sigma, -d_max, d_max)
           (r and d are constants for the gradient: stop_gradient),
           y = gamma * ((x - mean_B) / sigma_B * r + d) + beta
           mu <- mu + a (mean_B - mu),  sigma <- sigma + a (sigma_B - sigma)  (a = momentum),
           stored as running_var = sigma^2 - eps so that
    eval:  y = gamma * (x - mu) / sqrt(running_var + eps) + beta   (= gamma (x - mu)/sigma + beta)
    r_max, d_max follow `renorm_limits` at step num_batches_tracked.
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5,
                 affine: bool = True, rmax: float = 3.0, dmax: float = 5.0,
                 warmup_steps: int = 5000, rmax_ramp_steps: int = 35000,
                 dmax_ramp_steps: int = 20000):
        super().__init__(num_features, eps, momentum, affine, True)
        self.schedule = dict(rmax=rmax, dmax=dmax, warmup_steps=warmup_steps,
                             rmax_ramp_steps=rmax_ramp_steps, dmax_ramp_steps=dmax_ramp_steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self._eval(x)
        xf, w, b = self._train_inputs(x)
        dims, shape = _dims(x), _shape(x)
        mean = xf.mean(dims)
        std_b = torch.sqrt(xf.var(dims, unbiased=False) + self.eps)
        rmax, dmax = renorm_limits(int(self.num_batches_tracked), **self.schedule)
        with torch.no_grad():
            std = torch.sqrt(self.running_var + self.eps).to(xf.dtype)
            r = (std_b / std).clamp(1.0 / rmax, rmax)
            d = ((mean - self.running_mean.to(xf.dtype)) / std).clamp(-dmax, dmax)
        xhat = (xf - mean.view(shape)) / std_b.view(shape) * r.view(shape) + d.view(shape)
        y = xhat * w.view(shape) + b.view(shape)
        with torch.no_grad():
            a = self.momentum
            self.num_batches_tracked += 1
            self.running_mean.add_(a * (mean - self.running_mean.to(xf.dtype)).to(
                self.running_mean.dtype))
            new_std = std + a * (std_b - std)
            self.running_var.copy_((new_std * new_std - self.eps).clamp_min(0))
        return y.to(x.dtype)


# -- cumulative ----------------------------------------------------------------------------------
def cumulative_norm(x: torch.Tensor, count: torch.Tensor, total: torch.Tensor,
                    total_sq: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize x with the pooled statistics of every value seen so far, this batch included.

    count, total, total_sq: per-channel n, sum x, sum x^2 of all earlier batches (constants).
    Returns (y, mean, var) with N = count + m, mean = (total + sum_B x) / N,
    var = (total_sq + sum_B x^2) / N - mean^2, y = weight * (x - mean) / sqrt(var + eps) + bias.
    Gradients flow through this batch's share of mean and var only (see CumulativeNorm).
    """
    dims, shape = _dims(x), _shape(x)
    m = x.numel() // x.shape[1]
    n_all = count + m
    mean = (total + x.sum(dims).to(total.dtype)) / n_all
    var = ((total_sq + (x * x).sum(dims).to(total.dtype)) / n_all - mean * mean).clamp_min(0)
    mean_x, var_x = mean.to(x.dtype), var.to(x.dtype)
    y = (x - mean_x.view(shape)) * torch.rsqrt(var_x + eps).view(shape)
    return y * weight.view(shape) + bias.view(shape), mean, var


class CumulativeNorm(_BatchStatNorm):
    """Normalization by the cumulative (global) statistics of all batches seen so far.

    After t training batches with m_s values per channel each, N_t = sum_s m_s,
    mu_t = (1/N_t) sum_{s<=t} sum_i x_{s,i},  v_t = (1/N_t) sum_{s<=t} sum_i x_{s,i}^2 - mu_t^2,
    i.e. the mean and (biased) variance of every value seen, equal-size batches weighing equally;
    y = gamma * (x - mu_t) / sqrt(v_t + eps) + beta, with the current batch t included.
    The sums of earlier batches are stored (float64 buffers) and are constants for the gradient,
    so with xhat_i = (x_i - mu_t) / sqrt(v_t + eps), g_i = dL/dy_i and sums over the current
    batch only:  dL/dbeta = sum g,  dL/dgamma = sum g xhat,
    dL/dx_j = gamma / sqrt(v_t + eps) * (g_j - (1/N_t) sum_i g_i - xhat_j (1/N_t) sum_i g_i xhat_i)
    (because d mu_t / dx_j = 1/N_t and d v_t / dx_j = 2 (x_j - mu_t) / N_t). For the first batch
    N_t = m and this is BN's gradient; later the current batch's share m/N_t, and with it the
    gradient through the statistics, shrinks towards zero.
    running_mean/running_var hold mu_t and v_t; eval mode normalizes with them (no update).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_features, eps, None, affine, True)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("total", torch.zeros(num_features, dtype=torch.float64))
        self.register_buffer("total_sq", torch.zeros(num_features, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self._eval(x)
        xf, w, b = self._train_inputs(x)
        y, mean, var = cumulative_norm(xf, self.count, self.total, self.total_sq, w, b,
                                       self.eps)
        with torch.no_grad():
            dims = _dims(xf)
            self.count += xf.numel() // xf.shape[1]
            self.total += xf.sum(dims).double()
            self.total_sq += (xf * xf).sum(dims).double()
            self.num_batches_tracked += 1
            self.running_mean.copy_(mean)
            self.running_var.copy_(var)
        return y.to(x.dtype)


# -- ghost ---------------------------------------------------------------------------------------
class GhostBatchNorm(_BatchStatNorm):
    """Ghost batch norm (Hoffer et al. 2017): BN over virtual batches of at most v examples.

    train: the batch is cut into k = ceil(N / v) near-equal consecutive chunks; each chunk is
           normalized with its own mean_B and var_B (then affine). The running statistics are
           updated once per batch, with the average over chunks of the chunk means and of the
           unbiased chunk variances.
    eval:  as BN (running statistics).
    """

    def __init__(self, num_features: int, virtual_batch_size: int = 32, momentum: float = 0.1,
                 eps: float = 1e-5, affine: bool = True):
        super().__init__(num_features, eps, momentum, affine, True)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return self._eval(x)
        xf, dims = x.to(_compute_dtype(x)), _dims(x)
        w, b = self._affine(x)
        chunks = torch.tensor_split(xf, math.ceil(len(xf) / self.virtual_batch_size))
        outs, means, vars_ = [], [], []
        for c in chunks:
            m = _values_per_channel(c)
            outs.append(F.batch_norm(c, None, None, w, b, True, 0.0, self.eps))
            with torch.no_grad():
                means.append(c.mean(dims))
                vars_.append(c.var(dims, unbiased=False) * m / (m - 1))
        with torch.no_grad():
            self.num_batches_tracked += 1
            f = self._momentum()
            self.running_mean.lerp_(torch.stack(means).mean(0).to(self.running_mean.dtype), f)
            self.running_var.lerp_(torch.stack(vars_).mean(0).to(self.running_var.dtype), f)
        return torch.cat(outs).to(x.dtype)


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
