"""The optimizer side of a run: parameter groups, SGD, the learning-rate schedule, and SGD over a
pack of runs with each run's own hyperparameters (`PackedSGD`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from bnlab.config import RunConfig


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Weight decay on conv/linear weights only, unless `decay_norm_and_bias`.

    Norm scales/shifts, biases and the scalar Fixup/SkipInit parameters are all 0- or 1-d, so
    the split is by dimension.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if (p.ndim > 1 or decay_norm_and_bias) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_sgd(model: nn.Module, cfg: RunConfig, lr: float,
             device: torch.device) -> torch.optim.SGD:
    """The run's optimizer. On CUDA torch's fused SGD: one kernel per parameter group and
    little Python per step (the multi-tensor path takes ~0.3 ms per ResNet-20 step on the host,
    0.1 ms fused, timed with the parameters on a CPU), host time a GPU run waits for.
    Elsewhere the default path, whose arithmetic CPU runs have always had (fused differs by
    ~1 ulp)."""
    return torch.optim.SGD(param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias),
                           lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           fused=device.type == "cuda")


def lr_factor(cfg: RunConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warm-up, then the schedule.

    'step' divides by 10 at 50% and 75% of training (He et al. 2016 trained 64k iterations with
    /10 at 32k and 48k); 'cosine' decays to 0 at the end; 'constant' keeps 1.
    """
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "step":
        return 0.01 if step >= 0.75 * total else 0.1 if step >= 0.5 * total else 1.0
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1.0, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def peak_lr(cfg: RunConfig) -> float:
    """cfg.lr, or with lr_scaling 'linear' cfg.lr x batch_size / 256 (the global batch)."""
    return cfg.lr * cfg.batch_size / 256 if cfg.lr_scaling == "linear" else cfg.lr


def single_optimizer(model: nn.Module, cfg: RunConfig, lr: float) -> torch.optim.SGD:
    """An optimizer of train_run's kind over `model` (whose device decides fused or not), to
    read and write the momentum buffers in the single-run checkpoint format."""
    return make_sgd(model, cfg, lr, next(model.parameters()).device)


class PackedSGD:
    """torch.optim.SGD (dampening 0) on packed parameters, with per-run hyperparameters:

        d = grad + wd_k * p;   buf = momentum_k * buf + d;   p = p - lr_k * (d + momentum_k *
        buf if nesterov else buf)

    where `_k` is the value of the run owning the entry. A zero buffer makes the first step
    `buf = d`, as torch's buffer creation does. Weight decay follows `param_groups`: on
    parameters of more than one dimension in the single model, or on all with
    decay_norm_and_bias.

    All parameters (and momentum buffers) live in one flat tensor, each parameter a view of
    its own segment with its own strides (channels_last included), and the per-run
    coefficients are spread over that tensor once. A step is then a handful of element-wise
    operations over the whole pack whatever the number of parameters and runs (a loop over
    the parameters would launch ~8 kernels per parameter per step, which dominated the step
    of small packs on a GPU). The arithmetic is the formula above, entry by entry, so the
    result is the one a per-parameter loop gives, bit for bit.
    """

    def __init__(self, model: nn.Module, cfgs: list[RunConfig], single_ndim: dict[str, int],
                 bufs: dict[str, torch.Tensor] | None = None,
                 owned: dict[str, list[bool]] | None = None):
        """`owned[name][k]` False: run k's network has no such parameter (a bias or norm
        parameter held for the other runs of a mixed pack); its entries never change."""
        self.k, self.nesterov = len(cfgs), cfgs[0].nesterov
        self.params = dict(model.named_parameters())
        ref = next(iter(self.params.values()))
        dtype, device = ref.dtype, ref.device
        sizes = {n: p.numel() for n, p in self.params.items()}
        total = sum(sizes.values())
        self.flat = torch.empty(total, dtype=dtype, device=device)
        self.buf = torch.zeros(total, dtype=dtype, device=device)
        run = torch.empty(total, dtype=torch.int64)
        mom = torch.empty(total, dtype=torch.float64)
        wd = torch.zeros(total, dtype=torch.float64)
        live = torch.ones(total, dtype=torch.bool)
        momentum = torch.tensor([c.momentum for c in cfgs], dtype=torch.float64)
        self.segments: dict[str, tuple[int, int]] = {}
        self.bufs: dict[str, torch.Tensor] = {}
        offset = 0
        for name, p in self.params.items():
            n = sizes[name]
            if p.dtype != dtype or p.device != device:
                raise ValueError(f"packed parameter {name} is {p.dtype} on {p.device}, the "
                                 f"others {dtype} on {device}")
            if not _runs_outermost(p, self.k):
                raise ValueError(f"packed parameter {name} ({tuple(p.shape)}, strides "
                                 f"{p.stride()}) does not keep each run's entries together")
            view = torch.as_strided(self.flat, p.shape, p.stride(), offset)
            view.copy_(p.detach())
            p.data = view
            self.bufs[name] = torch.as_strided(self.buf, p.shape, p.stride(), offset)
            if bufs is not None:
                self.bufs[name].copy_(bufs[name])
            owner = torch.arange(self.k).repeat_interleave(n // self.k)
            run[offset:offset + n] = owner
            mom[offset:offset + n] = momentum[owner]
            if single_ndim[name] > 1:
                wd[offset:offset + n] = torch.tensor([c.weight_decay for c in cfgs],
                                                     dtype=torch.float64)[owner]
            else:
                wd[offset:offset + n] = torch.tensor(
                    [c.weight_decay if c.decay_norm_and_bias else 0.0 for c in cfgs],
                    dtype=torch.float64)[owner]
            if owned is not None and not all(owned[name]):
                mine = torch.tensor(owned[name])[owner]
                live[offset:offset + n] = mine
                wd[offset:offset + n] *= mine
            self.segments[name] = (offset, n)
            offset += n
        self.run = run.to(device)
        self.mom = mom.to(device=device, dtype=dtype)
        self.wd = wd.to(device=device, dtype=dtype) if bool((wd != 0).any()) else None
        self.live = None if bool(live.all()) else live.to(device)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One update with learning rates `lr` (K,) on the parameters' device."""
        lr = lr.to(self.flat.dtype)
        grads = [(name, p.grad) for name, p in self.params.items()]
        if all(g is not None for _, g in grads):
            g = torch.cat([_storage_order(g, self.params[name]) for name, g in grads])
            self._update(slice(None), g, lr)
            return
        for name, g in grads:  # some parameters took no part: leave them (and their buffers)
            if g is not None:
                o, n = self.segments[name]
                self._update(slice(o, o + n), _storage_order(g, self.params[name]), lr)

    def _update(self, part: slice, g: torch.Tensor, lr: torch.Tensor) -> None:
        p, buf, m = self.flat[part], self.buf[part], self.mom[part]
        if self.live is not None:  # entries no run owns get no gradient (so never move)
            g = torch.where(self.live[part], g, 0.0)
        d = g if self.wd is None else g + self.wd[part] * p
        buf.mul_(m).add_(d)
        upd = d + m * buf if self.nesterov else buf
        p.sub_(lr[self.run[part]] * upd)


def _runs_outermost(p: torch.Tensor, k: int) -> bool:
    """p is dense and its first dimension (which holds the K runs in blocks) is outermost in
    memory, so run k's entries are block k of p's storage."""
    dense = p.is_contiguous() or (p.ndim == 4 and p.is_contiguous(
        memory_format=torch.channels_last))
    return dense and p.shape[0] % k == 0 and (p.ndim == 0 or p.stride(0) * p.shape[0]
                                               == p.numel())


def _storage_order(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """g's entries flattened in the memory order of p's (and so of p's flat segment)."""
    if g.stride() != p.stride():
        g = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=g.device).copy_(g)
    return g.as_strided((g.numel(),), (1,), g.storage_offset())


def lr_rows(cfgs: list[RunConfig], first_step: int, steps: int, spe: int) -> list[list[float]]:
    """Learning rate of each run at steps first_step, first_step+1, ... as train_run sets it."""
    return [[peak_lr(c) * lr_factor(c, first_step + i, spe) for c in cfgs] for i in range(steps)]
