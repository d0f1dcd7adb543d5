"""BN inference diagnostics of one model: why is it good in train mode and bad in eval mode?

What is measured (each only where the model's norm layers make it meaningful):

* eval-mode vs train-mode accuracy: in "train mode" every layer that uses batch statistics
  normalizes each test batch with that batch's own mean and biased variance instead of its
  running estimates (bnlab.infer.batchstats: the same for every norm; dropout stays off). The
  model's running statistics are never modified (a copy runs).
* accuracy vs inference batch size in train mode, on the test set in one fixed shuffled order
  (seed 0; the stored order may be sorted by class, which would make each batch one class).
  A trailing batch of a single image is merged into the previous batch; a batch size above the
  number of test images n runs, and is reported, as one batch of n. At batch size 1 the
  batch statistics of a conv layer are those of one image (over its H x W positions: instance
  normalization); on a 1x1 map or after a linear layer there is one value per channel and its
  variance is 0: reported as not measurable.
* PreciseBN: population statistics recomputed from N training batches in both definitions of
  bnlab.infer.batchstats.LayerStats (pooled, and fvcore's equal-weight average of per-batch
  means and unbiased variances), and the eval accuracy with each.
* test statistics: the statistics re-estimated on the test images themselves (AdaBN on the
  clean test set), and the eval accuracy with them.
* per layer, how far the running statistics are from the recomputed ones (mean shift, variance
  ratio, and the KL divergence between the two per-channel Gaussians), with the layers ranked.
* sanity checks of the running statistics, and a short answer built from these numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from bnlab.data.bundle import Tensors
from bnlab.infer.batchstats import (
    LayerStats,
    adapted_to_test,
    batch_stat_layers,
    batch_statistics_copy,
    precise_statistics,
    with_statistics,
)
from bnlab.infer.diagnose_text import answer, format_diagnose
from bnlab.infer.loading import (
    EVAL_BATCH,
    Loaded,
    norm_layers,
    shuffled_order,
    test_loader,
    train_loader,
)
from bnlab.infer.metrics import accuracy

BATCH_SIZES = (1, 2, 8, 32, 128, 1000)
PRECISE_BATCHES = 100  # training batches averaged by PreciseBN (fvcore's default is 200)
NEAR_ZERO_VAR = 1e-8  # running variance at or below this (and below eps) counts as ~0
DEAD_GAMMA = 1e-6  # |gamma| at or below this: the channel's output is the constant beta
STREAMED_TEST_LIMIT = 2000  # test images held in memory for large-image (streamed) data


def _test_tensors(loaded: Loaded, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The test set (or `limit` images of it) in a fixed shuffled order, on the device.

    Streamed (large-image) test sets are capped at STREAMED_TEST_LIMIT images unless `limit`
    says otherwise, since they are held in memory as float tensors here (a loader's images,
    in memory already, are not).
    """
    bundle = loaded.bundle
    order = shuffled_order(len(bundle.test))  # the order of shuffled_test_loader
    if bundle.streamed:
        cap = limit or _test_limit(bundle)
        order = order[:cap] if cap else order
        sub = torch.utils.data.Subset(bundle.test, order.tolist())
        dl = torch.utils.data.DataLoader(sub, batch_size=100, num_workers=min(4, loaded.workers))
        xs, ys = zip(*dl)
        return torch.cat(xs).to(loaded.device), torch.cat(ys).to(loaded.device)
    xs, ys = [], []
    for x, y in test_loader(loaded).epoch(0):
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    order = order.to(y.device)
    if limit:
        order = order[:limit]
    return x[order], y[order]


def _test_limit(bundle) -> int:
    """The cap on test images of streamed files (0: none): images given in memory
    (a loader's, Tensors) are all used."""
    return STREAMED_TEST_LIMIT if bundle.streamed and not isinstance(bundle.test, Tensors) \
        else 0


def effective_batch_sizes(batch_sizes, n: int) -> tuple[list[int], list[int]]:
    """The batch sizes that run on n test images, each once, and the requested ones above n:
    those run as one batch of n, and are reported as n, since that is what was measured."""
    sizes = list(dict.fromkeys(min(int(b), n) for b in batch_sizes))
    return sizes, [int(b) for b in batch_sizes if int(b) > n]


def _batches(n: int, b: int) -> list[tuple[int, int]]:
    edges = list(range(0, n, b)) + [n]
    spans = list(zip(edges[:-1], edges[1:]))
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1 and b > 1:
        spans[-2:] = [(spans[-2][0], n)]
    return spans


@torch.no_grad()
def batch_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    outs = [model(x[lo:hi]).float() for lo, hi in _batches(len(y), batch)]
    return accuracy(torch.cat(outs), y)


def train_batches(loaded: Loaded, n: int):
    """The first n training batches PreciseBN reads (epochs repeat when n is larger)."""
    loader = train_loader(loaded)
    done, epoch = 0, 1
    while done < n:
        for x, _ in loader.epoch(epoch):
            yield x
            done += 1
            if done >= n:
                return
        epoch += 1


def stat_gap(layer: nn.Module, s: LayerStats) -> dict:
    """Running vs recomputed (pooled) statistics of one layer, per channel c, then averaged
    and maximized over channels, with v = var + eps on both sides:

        mean shift   |mu_run - mu| / sqrt(v)                  (in units of the data's std)
        var ratio    |ln(v_run / v)|
        KL           KL(N(mu, v) || N(mu_run, v_run))
                     = 1/2 (ln(v_run / v) + (v + (mu - mu_run)^2) / v_run - 1)   (nats)

    The KL divergence is how badly the running statistics' Gaussian describes the data's, so
    it ranks the layers by both mismatches at once."""
    eps = float(getattr(layer, "eps", 1e-5))
    rm, rv = layer.running_mean.double().cpu(), layer.running_var.double().cpu() + eps
    mean, v = s.mean.cpu(), s.var.cpu() + eps
    shift = (rm - mean).abs() / torch.sqrt(v)
    ratio = torch.log(rv / v).abs()
    kl = 0.5 * (torch.log(rv / v) + (v + (mean - rm) ** 2) / rv - 1.0)
    return {"mean_shift_max": float(shift.max()), "mean_shift_mean": float(shift.mean()),
            "var_logratio_max": float(ratio.max()), "var_logratio_mean": float(ratio.mean()),
            "kl_max": float(kl.max()), "kl_mean": float(kl.mean())}


def sanity(model: nn.Module) -> list[dict]:
    """Problems in the running statistics, per layer (only layers with a problem):
    non-finite values, near-zero variance (running_var <= max(1e-8, eps/10): the eval output
    divides by ~sqrt(eps)), dead channels (|gamma| <= 1e-6: constant output beta), and
    statistics never updated (num_batches_tracked = 0)."""
    out = []
    for name, m in norm_layers(model):
        rm, rv = m.running_mean.detach().cpu(), m.running_var.detach().cpu()
        eps = float(getattr(m, "eps", 1e-5))
        issue = {"layer": name, "channels": int(rm.numel())}
        nonfinite = int((~torch.isfinite(rm) | ~torch.isfinite(rv)).sum())
        near_zero = int((rv <= max(NEAR_ZERO_VAR, eps / 10)).sum())
        w = getattr(m, "weight", None)
        dead = int((w.detach().abs() <= DEAD_GAMMA).sum()) if isinstance(w, torch.Tensor) else 0
        tracked = getattr(m, "num_batches_tracked", None)
        never = isinstance(tracked, torch.Tensor) and int(tracked) == 0
        for k, v in (("nonfinite", nonfinite), ("near_zero_var", near_zero), ("dead", dead)):
            if v:
                issue[k] = v
        if never:
            issue["never_updated"] = True
        if len(issue) > 2:
            out.append(issue)
    return out


def diagnose(loaded: Loaded, batch_sizes=BATCH_SIZES, precise_batches: int = PRECISE_BATCHES,
             max_images: int = 0, log=print) -> dict:
    """All diagnostics of one loaded model, as a dict (see the module docstring)."""
    model = loaded.model.eval()
    running = norm_layers(model)
    layers = batch_stat_layers(model)
    other_norms = [n for n, m in model.named_modules()
                   if isinstance(m, nn.GroupNorm | nn.LayerNorm | nn.modules.batchnorm._NormBase)
                   and n not in dict(running)]
    x, y = _test_tensors(loaded, max_images)
    with torch.no_grad():
        eval_acc = batch_accuracy(model, x, y, EVAL_BATCH)
    res = {"checkpoint": str(loaded.path), "model": loaded.model_name, "norm": loaded.norm_name,
           "n_test": len(y), "eval_acc": eval_acc, "running_stat_layers": len(running),
           "batch_stat_layers": len(layers), "other_norm_layers": len(other_norms),
           "train_batch_size": loaded.batch_size,
           "not_applicable": []}
    if running:
        res["sanity"] = sanity(model)
    if not layers:
        why = ("no layer keeps running statistics" if not running else
               f"the {len(running)} layers with running statistics never use batch statistics "
               "(fixed statistics)")
        res["not_applicable"] = [f"train-mode accuracy, batch-size dependence, PreciseBN and "
                                 f"the running-statistics gap: {why} (norm {loaded.norm_name!r}),"
                                 " so train and eval mode normalize alike"]
        res["answer"] = answer(res)
        return res
    tm, _ = batch_statistics_copy(model)
    res["train_mode_acc"] = {}
    sizes, larger = effective_batch_sizes(batch_sizes, len(y))
    if larger:
        many = len(larger) > 1
        res["batch_size_note"] = (f"batch size{'s' if many else ''} "
                                  f"{', '.join(str(b) for b in larger)} "
                                  f"{'are' if many else 'is'} larger than the {len(y)} test "
                                  f"images: measured as one batch of {len(y)}")
    for b in sizes:
        try:
            res["train_mode_acc"][str(b)] = batch_accuracy(tm, x, y, b)
        except ValueError as e:
            res["train_mode_acc"][str(b)] = None
            res.setdefault("train_mode_errors", {})[str(b)] = str(e).splitlines()[0]
        log(f"  train-mode batch {b}: {res['train_mode_acc'][str(b)]}")
    if precise_batches > 0:
        stats = precise_statistics(model, train_batches(loaded, precise_batches))
        modules = dict(model.named_modules())
        gaps = [{"layer": name, "values_per_channel": s.values, **stat_gap(modules[name], s)}
                for name, s in stats.items()]
        res["precise_acc"] = batch_accuracy(with_statistics(model, stats, "pooled"), x, y,
                                            EVAL_BATCH)
        res["precise_fvcore_acc"] = batch_accuracy(with_statistics(model, stats, "fvcore"), x,
                                                   y, EVAL_BATCH)
        res["precise"] = {"batches": precise_batches, "batch_size": loaded.batch_size,
                          "gaps": gaps,
                          "ranking": [g["layer"] for g in sorted(gaps, key=lambda g:
                                                                 -g["kl_mean"])]}
    limit = max_images or _test_limit(loaded.bundle)
    res["test_stats_acc"] = batch_accuracy(adapted_to_test(loaded, limit), x, y, EVAL_BATCH)
    res["answer"] = answer(res)
    return res


__all__ = ["diagnose", "effective_batch_sizes", "format_diagnose", "precise_statistics",
           "sanity", "stat_gap", "train_batches"]
