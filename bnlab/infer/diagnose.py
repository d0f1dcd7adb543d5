"""BN inference diagnostics of one checkpoint.

What is measured (each only where the model's norm layers make it meaningful):

* eval-mode vs train-mode accuracy: the norm layers in training mode normalize with the
  statistics of each test batch instead of the running (EMA) estimates; dropout stays in eval
  mode so that only the norm layers differ. Running statistics are never modified (the
  train-mode passes run on a copy of the model).
* accuracy vs inference batch size with the norms in training mode, on the test set in one
  fixed shuffled order (seed 0; the stored order may be sorted by class, which would make each
  batch one class). A trailing batch of a single image is merged into the previous batch.
  At batch size 1 the batch statistics of a conv layer are those of one image (over its H x W
  positions: instance normalization); on a 1x1 map or after a linear layer there is one value
  per channel, its variance is 0, and PyTorch refuses to normalize ("Expected more than 1 value
  per channel when training"): reported as not measurable.
* PreciseBN (`precise_statistics`): population statistics recomputed with a true average over
  all samples of N training batches, then the eval accuracy with them.
* EMA vs precise gap per layer, and sanity checks of the running statistics.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bnlab.console import format_table
from bnlab.infer.loading import EVAL_BATCH, Loaded, norm_layers, test_loader, train_loader
from bnlab.infer.metrics import accuracy

BATCH_SIZES = (1, 2, 8, 32, 128, 1000)
PRECISE_BATCHES = 100  # training batches averaged by PreciseBN (fvcore's default is 200)
NEAR_ZERO_VAR = 1e-8  # running variance at or below this (and below eps) counts as ~0
DEAD_GAMMA = 1e-6  # |gamma| at or below this: the channel's output is the constant beta
STREAMED_TEST_LIMIT = 2000  # test images held in memory for large-image (streamed) data


def _norms_train(model: nn.Module) -> nn.Module:
    """A copy of `model` in eval mode except its running-statistics norm layers."""
    m = copy.deepcopy(model).eval()
    for _, layer in norm_layers(m):
        layer.train()
    return m


def _test_tensors(loaded: Loaded, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The test set (or `limit` images of it) in a fixed shuffled order, on the device.

    Streamed (large-image) test sets are capped at STREAMED_TEST_LIMIT images unless `limit`
    says otherwise, since they are held in memory as float tensors here.
    """
    bundle = loaded.bundle
    order = torch.randperm(len(bundle.test), generator=torch.Generator().manual_seed(0))
    if bundle.streamed:
        order = order[: limit or STREAMED_TEST_LIMIT]
        sub = torch.utils.data.Subset(bundle.test, order.tolist())
        dl = torch.utils.data.DataLoader(sub, batch_size=100,
                                         num_workers=min(4, loaded.cfg.workers))
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


@torch.no_grad()
def precise_statistics(model: nn.Module, batches, layers: list[str] | None = None
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Population mean and variance of the input of each running-statistics norm layer.

    The norm layers run in training mode over the given batches (dropout stays off), so every
    norm normalizes with its batch statistics as during training and each layer sees the
    inputs it saw then. For every channel c the input values of all samples and positions of
    all batches are pooled, M values in all, and

        mean_c = (1/M) sum x,    var_c = (1/M) sum (x - mean_c)^2     (biased, divisor M)

    accumulated in float64 per batch and merged with Chan et al.'s parallel formula. This is the
    variance of the pooled sample, which includes the spread of the batch means; PyTorch's EMA
    instead averages unbiased per-batch variances (divisor m - 1, m = B*H*W values per
    channel and batch), and fvcore's PreciseBN averages those per-batch values with equal
    weights. With M in the millions, biased and unbiased differ by a factor M/(M-1) ~ 1.
    The batch size is that of `batches` (the training batch size when called by `diagnose`).
    The model's own running statistics are left unchanged (a copy runs).
    Returns {layer: (mean, var, M)}.
    """
    m = _norms_train(model)
    targets = dict(norm_layers(m))
    if layers is not None:
        targets = {k: v for k, v in targets.items() if k in layers}
    acc: dict[str, list] = {}

    def hook(name):
        def fn(_module, args):
            x = args[0].detach().double()
            dims = [d for d in range(x.ndim) if d != 1]
            n = x.numel() // x.shape[1]
            mean = x.mean(dim=dims)
            m2 = ((x - mean.view(1, -1, *([1] * (x.ndim - 2)))) ** 2).sum(dim=dims)
            if name not in acc:
                acc[name] = [n, mean, m2]
            else:
                na, ma, m2a = acc[name]
                tot = na + n
                delta = mean - ma
                acc[name] = [tot, ma + delta * (n / tot), m2a + m2 + delta ** 2 * (na * n / tot)]
        return fn

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in targets.items()]
    try:
        for x in batches:
            m(x)
    finally:
        for h in handles:
            h.remove()
    return {k: (v[1], v[2] / v[0], v[0]) for k, v in acc.items()}


def _train_batches(loaded: Loaded, n: int):
    loader = train_loader(loaded)
    done, epoch = 0, 1
    while done < n:
        for x, _ in loader.epoch(epoch):
            yield x
            done += 1
            if done >= n:
                return
        epoch += 1


def stat_gap(layer: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> dict:
    """EMA vs precise statistics of one layer, per channel then summarized over channels:
    mean shift |mu_ema - mu_precise| / sqrt(var_precise + eps) (in units of the population
    std) and variance log-ratio |ln((var_ema + eps) / (var_precise + eps))|."""
    eps = float(layer.eps)
    rm, rv = layer.running_mean.double().cpu(), layer.running_var.double().cpu()
    mean, var = mean.cpu(), var.cpu()
    shift = (rm - mean).abs() / torch.sqrt(var + eps)
    ratio = torch.log((rv + eps) / (var + eps)).abs()
    return {"mean_shift_max": float(shift.max()), "mean_shift_mean": float(shift.mean()),
            "var_logratio_max": float(ratio.max()), "var_logratio_mean": float(ratio.mean())}


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
    """All diagnostics of one loaded checkpoint, as a dict (see the module docstring)."""
    model = loaded.model.eval()
    layers = norm_layers(model)
    other_norms = [n for n, m in model.named_modules()
                   if isinstance(m, nn.GroupNorm | nn.LayerNorm | nn.modules.batchnorm._NormBase)
                   and n not in dict(layers)]
    x, y = _test_tensors(loaded, max_images)
    with torch.no_grad():
        eval_acc = batch_accuracy(model, x, y, EVAL_BATCH)
    res = {"checkpoint": str(loaded.path), "model": loaded.cfg.model, "norm": loaded.cfg.norm,
           "n_test": len(y), "eval_acc": eval_acc, "running_stat_layers": len(layers),
           "other_norm_layers": len(other_norms), "not_applicable": []}
    if not layers:
        why = ("no layer keeps running statistics (norm "
               f"{loaded.cfg.norm!r}), so train and eval mode normalize alike")
        res["not_applicable"] = [f"train-mode accuracy, batch-size dependence, PreciseBN, "
                                 f"EMA gap and running-statistics checks: {why}"]
        return res
    tm = _norms_train(model)
    res["train_mode_acc"] = {}
    for b in batch_sizes:
        try:
            res["train_mode_acc"][str(b)] = batch_accuracy(tm, x, y, b)
        except ValueError as e:
            res["train_mode_acc"][str(b)] = None
            res.setdefault("train_mode_errors", {})[str(b)] = str(e).splitlines()[0]
        log(f"  train-mode batch {b}: {res['train_mode_acc'][str(b)]}")
    res["sanity"] = sanity(model)
    if precise_batches > 0:
        stats = precise_statistics(model, _train_batches(loaded, precise_batches))
        pm = copy.deepcopy(model)
        gaps = []
        for name, layer in norm_layers(pm):
            if name not in stats:
                continue
            mean, var, count = stats[name]
            gaps.append({"layer": name, "values_per_channel": count,
                         **stat_gap(layer, mean, var)})
            layer.running_mean.copy_(mean.to(layer.running_mean))
            layer.running_var.copy_(var.to(layer.running_var))
        with torch.no_grad():
            res["precise_acc"] = batch_accuracy(pm.eval(), x, y, EVAL_BATCH)
        res["precise"] = {"batches": precise_batches, "batch_size": loaded.cfg.batch_size,
                          "gaps": gaps}
    return res


def format_diagnose(res: dict) -> str:
    lines = [f"checkpoint {res['checkpoint']}  ({res['model']}, norm {res['norm']}, "
             f"{res['n_test']} test images)",
             f"eval-mode accuracy"
             f"{' (running statistics)' if res['running_stat_layers'] else ''}: "
             f"{res['eval_acc']:.4f}"]
    for text in res["not_applicable"]:
        lines.append(f"not applicable: {text}")
    if "train_mode_acc" in res:
        lines.append("train-mode accuracy (norms use test-batch statistics) by batch size:")
        rows = []
        for b, a in res["train_mode_acc"].items():
            note = res.get("train_mode_errors", {}).get(b, "")
            rows.append([b, "n/a" if a is None else f"{a:.4f}",
                         f"not measurable: {note}" if note else ""])
        lines.append(format_table(["batch", "accuracy", "note"], rows))
    if "precise_acc" in res:
        p = res["precise"]
        lines.append(f"PreciseBN ({p['batches']} training batches of {p['batch_size']}): "
                     f"eval accuracy {res['precise_acc']:.4f} "
                     f"(EMA statistics: {res['eval_acc']:.4f})")
        rows = [[g["layer"], f"{g['mean_shift_mean']:.4f}", f"{g['mean_shift_max']:.4f}",
                 f"{g['var_logratio_mean']:.4f}", f"{g['var_logratio_max']:.4f}"]
                for g in p["gaps"]]
        lines.append(format_table(["layer", "mean shift/std (avg)", "(max)",
                                   "|ln var ratio| (avg)", "(max)"], rows))
    if "sanity" in res:
        if not res["sanity"]:
            lines.append("running statistics: all finite, no near-zero variance, "
                         "no dead channels")
        for s in res["sanity"]:
            parts = [f"{k} {v}" for k, v in s.items() if k not in ("layer", "channels")]
            lines.append(f"running statistics of {s['layer']} ({s['channels']} channels): "
                         + ", ".join(parts))
    return "\n".join(lines)


__all__ = ["diagnose", "format_diagnose", "precise_statistics", "sanity"]
