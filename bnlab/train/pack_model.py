"""The pack itself: its runs (`Member`), the live packed network and optimizer (`Pack`), the
packed batches, evaluation, each run's checkpoint and each probed run's probes.

A member keeps the state it would have alone (its model as its own seed builds it, its
momentum buffers, its RNG states) whenever it is outside the pack's tensors: between packs
(`Pack.sync_members`), in its checkpoint (`member_checkpoint`) and at its probe steps
(`MemberProbe`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.config import RunConfig
from bnlab.data import DataBundle, Split, loader
from bnlab.data.loader import Normalizer, crop_flip, epoch_plan
from bnlab.fast import step_graph
from bnlab.fast.accel import memory_format_for, pad_batch, prepare
from bnlab.models.grouped import empty_pack, owned_entries, pack_state, unpack_state, zero_fill
from bnlab.runtime import autocast
from bnlab.store import Store
from bnlab.train.evaluate import batch_sums
from bnlab.train.loop import sgd_step
from bnlab.train.optim import PackedSGD, single_optimizer
from bnlab.train.probe_batch import ProbeBatch
from bnlab.train.probes import make_prober
from bnlab.train.record import RunRecord, checkpoint_state


class Member:
    """One run of a pack: its record (progress and folder), the state it entered the pack
    with and, for a run with probes, its prober. `store=None` keeps the record in memory
    only."""

    def __init__(self, cfg: RunConfig, store: Store | None):
        self.rec = RunRecord(store, cfg)
        self.model_state = self.bufs = self.template = None
        self.rng_cpu = self.rng_cuda = None
        self.status = "running"
        self.last_lr = cfg.lr
        self.probe: MemberProbe | None = None

    @property
    def cfg(self) -> RunConfig:
        return self.rec.cfg

    def stop(self, status: str) -> None:
        """The run leaves training with `status`; its probes so far are written."""
        self.status = status
        if self.probe is not None:
            self.probe.prober.close()
            self.probe = None


def format_of(p: torch.Tensor):
    if p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Pack:
    """The live packed model and optimizer of the members still training."""

    def __init__(self, members: list[Member], device: torch.device,
                 log: Callable[[str], None] | None = None):
        self.members = members
        cfgs = [m.cfg for m in members]
        templates = [m.template for m in members]
        fmt = memory_format_for(device, cfgs[0].model)
        self.model = empty_pack(templates).to(device=device, memory_format=fmt)
        self.model.load_state_dict(pack_state([m.model_state for m in members],
                                              self.model.state_dict()))
        params = dict(self.model.named_parameters())
        bufs = pack_state([m.bufs for m in members], params, fill=zero_fill)
        bufs = {n: b.contiguous(memory_format=format_of(params[n])) for n, b in bufs.items()}
        ndim = {n: p.ndim for t in templates for n, p in t.named_parameters()}
        self.opt = PackedSGD(self.model, cfgs, ndim, bufs,
                             owned=owned_entries(templates, self.model))
        c = cfgs[0]
        graphed = c.cuda_graph and step_graph.supported(device)
        self.fast = prepare(self.model, device, c.compile, whole_step_graph=graphed)
        self.batch, self.precision, self.smoothing = c.batch_size, c.precision, c.label_smoothing
        self.device, self.graphed = device, graphed
        self.step = step_graph.StepGraph(self._step, device, log=log) if graphed else self._step

    def _step(self, x: torch.Tensor, y: torch.Tensor, lr: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of every member: (each run's loss (K,), each run's correct predictions)."""
        k = len(self.members)
        self.opt.zero_grad()
        with autocast(self.device, self.precision, cache=not self.graphed):
            out = self.fast(x)
        out = out.float().reshape(self.batch, k, -1)
        losses = F.cross_entropy(out.permute(0, 2, 1), y, reduction="none",
                                 label_smoothing=self.smoothing).mean(0)  # (K,): each run's loss
        losses.sum().backward()
        self.opt.step(lr)
        return losses.detach(), (out.detach().argmax(2) == y).sum(0)

    def member_state(self, i: int) -> tuple[dict, dict]:
        """Member i's current weights (a state dict of its own network) and momentum buffers."""
        k, m = len(self.members), self.members[i]
        own = dict(m.template.named_parameters())
        state = unpack_state(self.model.state_dict(), i, k, m.template.state_dict())
        bufs = unpack_state(self.opt.bufs, i, k, own)
        return state, {n: b.contiguous(memory_format=format_of(own[n]))
                       for n, b in bufs.items()}

    def sync_members(self) -> None:
        """Copy each member's current weights and momentum buffers out of the pack."""
        for i, m in enumerate(self.members):
            m.model_state, m.bufs = self.member_state(i)


class MemberProbe:
    """The probes of one run of a pack, taken on the run's own network.

    At a probe step the run's weights and momentum buffers are copied out of the pack into its
    own model, which takes that step alone, on the run's slice of the packed batch, through
    the lone loop's own step (bnlab.train.loop.sgd_step) with the run's own prober
    (bnlab.train.probes.make_prober) attached, exactly as a lone run probes; its rows go to
    the run's probes.jsonl. The pack's step then trains the run as usual: the probe only
    measures (the lone update is discarded), so the pack, CUDA graph included, is the same
    with or without probes."""

    def __init__(self, m: Member, device: torch.device, batch: ProbeBatch | None = None):
        self.member, self.device = m, device
        cfg = m.cfg
        self.model = m.template
        self.opt = single_optimizer(self.model, cfg, cfg.lr)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.prober = make_prober(cfg, self.model, self.opt, self.criterion, m.rec.run,
                                  m.rec.epoch, m.rec.step, batch)

    def due(self, step: int) -> bool:
        return step % self.member.cfg.probe_every == 0

    def take(self, pack: Pack, i: int, step: int, epoch: int, lr: float, x: torch.Tensor,
             y: torch.Tensor) -> None:
        """Probe member i of `pack` at `step` on its own batch (x, y) at learning rate lr."""
        state, bufs = pack.member_state(i)
        self.model.load_state_dict(state)
        self.model.train()
        params = dict(self.model.named_parameters())
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.member.cfg.momentum != 0:
            for n, p in params.items():
                self.opt.state[p] = {"momentum_buffer": bufs[n]}
        self.prober.start(step, epoch, x, y)
        sgd_step(self.model, self.model, self.opt, self.criterion, self.member.cfg,
                 self.device, self.prober, x, y)


def packed_batches(members: list[Member], train: Split, norm: Normalizer, epoch: int,
                   spe: int, batch: int, augment: bool, flip: bool, device: torch.device):
    """Per step: the packed input (B, K*C, H, W) and labels (B, K); run k's slice is exactly
    the batch its own MemoryLoader would give it. The gather, crop and flip run once per chunk
    of steps (as in MemoryLoader); a step then only interleaves the runs' images and
    normalizes them."""
    n = len(train.y)
    plans = [epoch_plan(n, m.cfg.seed, epoch, augment, flip) for m in members]
    order = torch.stack([p[0] for p in plans]).to(device)  # (K, n)
    if augment:
        offsets = torch.stack([p[1] for p in plans]).to(device)  # (K, n, 2)
        flips = torch.stack([p[2] for p in plans]).to(device)  # (K, n)
    k = len(members)
    rows = torch.arange(k, device=device)[:, None]
    c, h, w = train.x.shape[1:]
    per = max(1, min(loader.MAX_CHUNK_BATCHES, loader.CHUNK_BYTES // (k * batch * c * h * w)))
    for c0 in range(0, spe, per):
        s = min(per, spe - c0)
        idx = order[:, c0 * batch:(c0 + s) * batch]  # (K, S*B)
        x = train.x[idx.reshape(-1)]
        if augment:
            x = crop_flip(x, offsets[rows, idx].reshape(-1, 2), flips[rows, idx].reshape(-1))
        x = x.reshape(k, s, batch, c, h, w)
        ys = train.y[idx].reshape(k, s, batch)
        for i in range(s):
            xi = x[:, i].transpose(0, 1).reshape(batch, k * c, h, w)
            yield norm(xi), ys[:, i].T


@torch.no_grad()
def evaluate_pack(pack: Pack, test: Split, bundle: DataBundle, device: torch.device, fmt
                  ) -> list[dict[str, float]]:
    """Each member's mean test cross-entropy, top-1 and top-5 accuracy (every run sees the same
    images), summed by evaluate_topk's own routine (batch_sums)."""
    k = len(pack.members)
    cfg = pack.members[0].cfg
    norm = Normalizer(bundle.mean, bundle.std, device, fmt)
    pack.model.eval()
    sums = torch.zeros(3, k, dtype=torch.float64, device=device)  # loss, top-1, top-5 per run
    n, eb = len(test.y), cfg.eval_batch_size
    for lo in range(0, n, eb):
        x, y = norm(test.x[lo:lo + eb]), test.y[lo:lo + eb]
        x = x.repeat(1, k, 1, 1).contiguous(memory_format=fmt)
        if cfg.compile:
            x = pad_batch(x, eb)
        with autocast(device, cfg.precision):
            out = pack.fast(x)[: len(y)]
        sums += batch_sums(out.float().reshape(len(y), k, -1), y[:, None].expand(-1, k))
    pack.model.train()
    return [{"loss": loss / n, "acc": top1 / n, "acc5": top5 / n}
            for loss, top1, top5 in sums.T.tolist()]


def member_checkpoint(m: Member, device: torch.device) -> dict:
    """The checkpoint train_run would have written for this run at this point."""
    model = m.template
    model.load_state_dict(m.model_state)
    opt = single_optimizer(model, m.cfg, m.last_lr)
    if m.cfg.momentum != 0:
        name_of = {id(p): n for n, p in model.named_parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p] = {"momentum_buffer": m.bufs[name_of[id(p)]]}
    r = m.rec
    state = checkpoint_state(m.cfg, model, opt, r.epoch, r.step, r.wall, r.flags, device)
    # training draws nothing from the global RNGs (dropout is not packable; probes restore
    # the states they use), so a lone run would still hold the states it had right after
    # building its model
    state["rng_cpu"], state["rng_cuda"] = m.rng_cpu, m.rng_cuda
    return state
