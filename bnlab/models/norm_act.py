"""The step after a conv in the post_conv placement: norm, the residual add where there is one,
ReLU, as one module call: `act(norm, x, residual)` = relu(norm(x) + residual).

A model's forward calls this step; which implementation runs it is fixed when the model is built
(`build_model(..., cpu_kernels=True)` calls `use_fused_norm_act`): torch's ops here, or
bnlab.fast.cpu_kernels' FusedNormAct, one CPU kernel for the three. Neither holds parameters:
the norm stays the model's own module, so state dicts, probes and packing see the same layers
either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.fast import cpu_kernels
from bnlab.fast.cpu_kernels import FusedNormAct  # re-exported: the two forms of the step


class NormAct(nn.Module):
    """relu(norm(x) + residual) (residual optional) with torch's ops."""

    def forward(self, norm: nn.Module, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        y = norm(x)
        if residual is not None:
            y = y + residual
        return F.relu(y)


def use_fused_norm_act(model: nn.Module, log: Callable[[str], None] | None = None) -> bool:
    """Swap each NormAct of `model` for a FusedNormAct when the model holds a norm the kernel
    computes (cpu_kernels.kernel_norm: a model of other norms would only ever take torch's ops)
    and the fused CPU kernels can be built or loaded on this machine (True); else leave the
    model as it is (False)."""
    if not any(cpu_kernels.kernel_norm(m) for m in model.modules()):
        return False
    if not cpu_kernels.prepare(log):
        return False
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is NormAct:
                setattr(parent, name, FusedNormAct())
    return True
