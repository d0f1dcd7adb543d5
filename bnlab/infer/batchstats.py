"""Norm layers that normalize with batch statistics, and their statistics recomputed on data.

Three diagnostics need a model whose norms normalize with the statistics of the batch in
front of them while nothing of the model changes: the accuracy against the inference batch size
("train mode"), PreciseBN (population statistics recomputed from training batches) and AdaBN
(statistics re-estimated on shifted test data). They share one mode, `batch_statistics_copy`:

    every layer that uses batch statistics normalizes channel c with the mean and the biased
    variance (divisor m) of its m = N * prod(spatial) input values of c in the current batch,
    mean_B = (1/m) sum x,  var_B = (1/m) sum (x - mean_B)^2,
    through the layer's own eval-mode formula, so eps, the affine and anything else the layer
    does at inference are its own.

That is what nn.BatchNorm does in training mode, minus the update of its running statistics.
It is not the training-mode forward of every bnlab norm: batch_renorm there mixes in its running
statistics (r and d), cumulative pools all batches seen so far, ghost splits the batch into
virtual batches of v images; in this mode each uses the whole batch and only the batch. bn_l2
keeps its running L2 denominator (a rescaling, not a statistic of the batch). The mode runs on
a deep copy, so the model's stored statistics never change.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bnlab.infer.loading import Loaded, norm_layers, shuffled_test_batches


def uses_batch_statistics(layer: nn.Module) -> bool:
    """True when the layer's training-mode output differs from its eval-mode output.

    Decided by behaviour on a copy, with a probe batch of mean 5 and std 3 (far from the
    default running statistics 0 and 1): BatchNorm and its variants differ; a layer with fixed
    statistics (frozen, torchvision's FrozenBatchNorm2d) gives the same output in both modes.
    """
    rm = getattr(layer, "running_mean", None)
    if not isinstance(rm, torch.Tensor):
        return False
    probe = copy.deepcopy(layer)
    g = torch.Generator().manual_seed(0)
    c = rm.numel()
    for shape in ((8, c, 3, 3), (8, c)):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 5).to(rm.device, rm.dtype)
        try:
            with torch.no_grad():
                y_eval = probe.eval()(x)
                y_train = probe.train()(x)
        except (RuntimeError, ValueError):  # the other rank of input
            continue
        return not torch.allclose(y_eval.double(), y_train.double(), rtol=1e-4, atol=1e-4)
    return False


def batch_stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The running-statistics layers of `model` that use batch statistics in training."""
    return [(n, m) for n, m in norm_layers(model) if uses_batch_statistics(m)]


def _channel_stats(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean_B, biased var_B, m) per channel of x (N, C, *), computed in `dtype`."""
    m = x.numel() // x.shape[1]
    if m < 2:  # the message of bnlab's own layers, for every layer alike
        raise ValueError(f"batch statistics need more than 1 value per channel, got input "
                         f"shape {tuple(x.shape)}")
    dims = [d for d in range(x.ndim) if d != 1]
    var, mean = torch.var_mean(x.detach().to(dtype), dim=dims, correction=0)
    return mean, var, m


class _UseBatchStatistics:
    """Forward pre-hook: the batch's statistics become the layer's running statistics (of the
    copy), and go to `sink` when one is set (PreciseBN, AdaBN)."""

    def __init__(self, sink: _Accumulator | None = None):
        self.sink = sink

    def __call__(self, module: nn.Module, args) -> None:
        x = args[0]
        mean, var, m = _channel_stats(x, torch.promote_types(x.dtype, torch.float32))
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)
        if self.sink is not None:
            self.sink.add(mean, var, m)


def batch_statistics_copy(model: nn.Module, layers: Iterable[str] | None = None,
                          sinks: dict[str, _Accumulator] | None = None
                          ) -> tuple[nn.Module, list[str]]:
    """A copy of `model` in eval mode whose batch-statistics layers (or the named `layers`)
    normalize every batch with its own statistics (module docstring).

    Returns (copy, names of the layers in that mode). Each of those layers refuses a batch with
    one value per channel (ValueError), as BatchNorm does in training.
    """
    m = copy.deepcopy(model).eval()
    names = [n for n, _ in batch_stat_layers(m)] if layers is None else list(layers)
    modules = dict(m.named_modules())
    for name in names:
        modules[name].register_forward_pre_hook(_UseBatchStatistics((sinks or {}).get(name)))
    return m, names


@dataclass
class LayerStats:
    """Statistics of one layer's input over N batches, per channel, in float64.

    pooled (the population of all M values, samples x positions x batches):
        mean = (1/M) sum x,   var = (1/M) sum (x - mean)^2          (biased, divisor M)
    fvcore (PreciseBN of fvcore's `update_bn_stats`: equal-weight averages of what BatchNorm
    computes per batch b of m_b values):
        avg_mean = (1/N) sum_b mean_b,
        avg_var = (1/N) sum_b var_b,  var_b = (1/(m_b - 1)) sum_b (x - mean_b)^2  (unbiased)
    With equal batches, mean == avg_mean, and var = (1/N) sum_b (m_b-1)/m_b var_b + spread of
    the batch means around mean: the pooled variance counts the between-batch spread of the
    means, the fvcore one does not.
    """

    mean: torch.Tensor
    var: torch.Tensor
    avg_mean: torch.Tensor
    avg_var: torch.Tensor
    values: int  # M
    batches: int  # N
    batch_values: int  # m of the first batch (all batches but a last one have it)


class _Accumulator:
    """Per-batch (mean, biased var, m) of one layer merged over batches in float64."""

    def __init__(self):
        self.n = 0
        self.batches = 0
        self.first_m = 0
        self.mean = self.m2 = self.sum_mean = self.sum_var = None

    def add(self, mean: torch.Tensor, var: torch.Tensor, m: int) -> None:
        mean, var = mean.detach().double(), var.detach().double()
        m2 = var * m
        unbiased = m2 / (m - 1)
        if self.mean is None:
            self.n, self.mean, self.m2 = m, mean, m2
            self.sum_mean, self.sum_var, self.first_m = mean.clone(), unbiased, m
        else:  # Chan et al.'s merge of (count, mean, sum of squared deviations)
            tot = self.n + m
            delta = mean - self.mean
            self.mean = self.mean + delta * (m / tot)
            self.m2 = self.m2 + m2 + delta ** 2 * (self.n * m / tot)
            self.n = tot
            self.sum_mean += mean
            self.sum_var += unbiased
        self.batches += 1

    def result(self) -> LayerStats:
        k = self.batches
        return LayerStats(self.mean, self.m2 / self.n, self.sum_mean / k, self.sum_var / k,
                          self.n, k, self.first_m)


@torch.no_grad()
def precise_statistics(model: nn.Module, batches: Iterable[torch.Tensor],
                       layers: list[str] | None = None) -> dict[str, LayerStats]:
    """Both definitions of LayerStats for the input of each batch-statistics layer of `model`
    (or of the named `layers`) over `batches`, in one pass.

    The copy runs in `batch_statistics_copy` mode, so each layer sees the inputs it sees when
    every norm normalizes with batch statistics (as in training, and as fvcore's PreciseBN
    runs its model). Each batch's statistics are the ones the layer normalizes with, computed
    in its precision (float32 for float32 inputs); they are merged over batches in float64.
    The batch size is that of `batches`. The model is left unchanged.
    """
    names = [n for n, _ in batch_stat_layers(model)] if layers is None else list(layers)
    acc = {name: _Accumulator() for name in names}
    m, _ = batch_statistics_copy(model, names, acc)
    for x in batches:
        m(x)
    return {k: a.result() for k, a in acc.items() if a.batches}


DEFINITIONS = ("pooled", "fvcore")


def with_statistics(model: nn.Module, stats: dict[str, LayerStats],
                    definition: str = "pooled") -> nn.Module:
    """A copy of `model` (eval mode) whose layers named in `stats` hold the recomputed
    statistics of `definition` ('pooled': mean, var; 'fvcore': avg_mean, avg_var)."""
    if definition not in DEFINITIONS:
        raise ValueError(f"definition must be one of {DEFINITIONS}, got {definition!r}")
    m = copy.deepcopy(model).eval()
    modules = dict(m.named_modules())
    for name, s in stats.items():
        layer = modules[name]
        mean, var = (s.mean, s.var) if definition == "pooled" else (s.avg_mean, s.avg_var)
        layer.running_mean.copy_(mean.to(layer.running_mean))
        layer.running_var.copy_(var.to(layer.running_var))
    return m


def adapted_copy(model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
    """AdaBN (Li et al. 2016): a copy whose batch-statistics layers hold the pooled statistics
    of their inputs over `batches` (the shifted data); the model itself is unchanged."""
    return with_statistics(model, precise_statistics(model, batches), "pooled")


def adapted_to_test(loaded: Loaded, max_images: int = 0) -> nn.Module:
    """AdaBN on the clean test images: a copy of the model with the statistics of the first
    `max_images` (0: all) test images in their fixed shuffled order."""
    return adapted_copy(loaded.model, shuffled_test_batches(loaded, max_images=max_images))


__all__ = ["DEFINITIONS", "LayerStats", "adapted_copy", "adapted_to_test", "batch_stat_layers",
           "batch_statistics_copy", "precise_statistics", "uses_batch_statistics",
           "with_statistics"]
