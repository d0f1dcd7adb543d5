"""The norms that change which values a training batch is normalized with: batch_renorm (the
batch's statistics corrected toward the running ones), cumulative (every value seen so far) and
ghost (virtual batches cut from the batch). Notation as in bnlab/norm/layers.py, which names
these layers with the others.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bnlab.norm.base import _BatchStatNorm, _compute_dtype, _dims, _shape, _values_per_channel


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
