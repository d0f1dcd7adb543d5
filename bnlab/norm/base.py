"""What the normalization layers share (bnlab/norm/layers.py has the notation): the dimensions
and shape of a channel's statistics, the dtype they are computed in, the check that a channel has
more than one value, and `_BatchStatNorm`, the base of the layers whose eval mode is BN's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
