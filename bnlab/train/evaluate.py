"""Evaluation of a model on a loader (always in eval mode), and the accuracy of guessing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.fast.accel import pad_batch
from bnlab.runtime import autocast
from bnlab.train.distributed import Context


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str = "fp32",
             pad_to: int | None = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a loader, always in eval mode. `pad_to` pads a
    short last batch (for compiled models, which then see a single shape)."""
    m = evaluate_topk(model, loader, device, precision, pad_to=pad_to)
    return m["loss"], m["acc"]


@torch.no_grad()
def evaluate_topk(model: nn.Module, loader, device: torch.device, precision: str = "fp32",
                  ctx: Context | None = None, pad_to: int | None = None) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (top-k: the label is among the k largest
    logits, k = min(5, classes)) over a loader in eval mode; with `ctx` the sums are taken over
    every process's shard."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1, top-5
    n = 0
    for x, y in loader.epoch(0):
        with autocast(device, precision):
            out = model(x if pad_to is None else pad_batch(x, pad_to))[: len(y)].float()
        sums += batch_sums(out, y)
        n += len(y)
    model.train(was_training)
    total = torch.cat([sums, torch.tensor([float(n)], dtype=torch.float64, device=device)])
    if ctx is not None:
        ctx.sum_(total)
    loss, top1, top5, n = total.tolist()
    return {"loss": loss / n, "acc": top1 / n, "acc5": top5 / n}


def batch_sums(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sums over a batch of logits `out` (N, ..., C) with labels `y` (N, ...), in float64:
    cross-entropy, top-1 hits and top-5 hits (the label among the k = min(5, C) largest
    logits), shape (3, ...). One model gives (N, C) and (3,); the K runs of a pack give
    (N, K, C) and (3, K), each run's sums as its own model's (bnlab.train.packed)."""
    top = out.topk(min(5, out.shape[-1]), dim=-1).indices
    hits = top == y.unsqueeze(-1)
    loss = F.cross_entropy(out.movedim(-1, 1), y, reduction="none")
    return torch.stack([loss.double().sum(0), hits[..., 0].sum(0).double(),
                        hits.any(-1).sum(0).double()])


def chance_threshold(num_classes: int, n_test: int) -> float:
    """Accuracy at or below which a model is indistinguishable from guessing: 1/K plus three
    binomial standard errors at the test-set size (at least one point)."""
    p = 1.0 / num_classes
    return p + max(0.01, 3.0 * math.sqrt(p * (1 - p) / max(1, n_test)))
