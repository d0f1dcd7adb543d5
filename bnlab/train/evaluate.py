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
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, n
    for x, y in loader.epoch(0):
        with autocast(device, precision):
            out = model(x if pad_to is None else pad_batch(x, pad_to))[: len(y)].float()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        hits = top == y[:, None]
        sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                             hits[:, 0].sum().double(), hits.any(1).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    model.train(was_training)
    if ctx is not None:
        ctx.sum_(sums)
    loss, top1, top5, n = sums.tolist()
    return {"loss": loss / n, "acc": top1 / n, "acc5": top5 / n}


def chance_threshold(num_classes: int, n_test: int) -> float:
    """Accuracy at or below which a model is indistinguishable from guessing: 1/K plus three
    binomial standard errors at the test-set size (at least one point)."""
    p = 1.0 / num_classes
    return p + max(0.01, 3.0 * math.sqrt(p * (1 - p) / max(1, n_test)))
