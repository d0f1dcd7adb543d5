"""Packed runs: K runs of one study trained at once as one grouped network (bnlab.models.packed).

Each run keeps everything a run trained alone has: its own initialization (built from its own
seed exactly as `train_run` builds it), its own data order and augmentation (its own
`epoch_plan`), its own BN statistics (its own channels), its own SGD momentum, learning rate,
schedule and weight decay, its own divergence handling (a diverging run stops; the others are
repacked without it and go on), and its own run folder with the same files `train_run` writes,
so status, reports and resume cannot tell a packed run from a lone one. A packed run can be
resumed alone, and a lone run's checkpoint can join a pack.

What may differ between the runs of a pack: PER_RUN below. Everything else must be equal.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bnlab import step_graph
from bnlab.accel import (
    FirstBad,
    mark_step,
    memory_format_for,
    pad_batch,
    prepare,
    tune_cpu_allocator,
)
from bnlab.config import FIELDS, RunConfig
from bnlab.cpu_kernels import use_cpu_kernels
from bnlab.data import DataBundle, Split, load_data, loader
from bnlab.data.loader import Normalizer, crop_flip, epoch_plan
from bnlab.errors import UserError
from bnlab.models.cifar_resnet import DEPTHS
from bnlab.models.packed import (
    NotPackable,
    check_packable,
    empty_pack,
    owned_entries,
    pack_state,
    unpack_state,
    zero_fill,
)
from bnlab.store import RunDir, Store
from bnlab.train import (
    _checkpoint,
    _summary,
    autocast,
    build_for,
    chance_threshold,
    config_record,
    lr_factor,
    make_sgd,
    resolve_device,
    train_run,
)

PER_RUN = ("seed", "norm", "init", "init_options", "lr", "momentum", "weight_decay",
           "decay_norm_and_bias", "schedule", "warmup_epochs")
# fields that may be anything as long as it is the same for every run of the pack
SHARED = ("dataset", "data_dir", "download", "limit_train", "limit_test", "augment", "model",
          "norm_options", "placement", "first_k", "batch_size", "epochs",
          "label_smoothing", "nesterov", "device", "precision", "eval_batch_size", "workers",
          "compile", "cuda_graph", "cpu_kernels")
MODELS = (*DEPTHS, "mlp3x100")
NORMS = ("bn", "none")
FINISHED = ("completed", "diverged", "no_learning")


def can_pack(cfgs: list[RunConfig]) -> str | None:
    """None when `cfgs` can train as one pack, else the reason they cannot."""
    if len(cfgs) < 2:
        return "a pack needs at least 2 runs"
    if len({c.run_id() for c in cfgs}) < len(cfgs):
        return "two configs of the pack are the same run"
    first = cfgs[0]
    for name in FIELDS:
        if name in PER_RUN:
            continue
        values = {repr(getattr(c, name)) for c in cfgs}
        if name not in SHARED:  # a field packing does not implement must stay at its default
            default = RunConfig().__getattribute__(name)
            if any(getattr(c, name) != default for c in cfgs):
                return f"{name} is not supported by packed training (only its default)"
        elif len(values) > 1:
            return f"{name} differs between the runs ({', '.join(sorted(values))})"
    if first.model not in MODELS:
        return f"model {first.model!r} is not packable (packable: {', '.join(MODELS)})"
    for c in cfgs:
        if c.norm not in NORMS:
            return f"norm {c.norm!r} is not packable (packable: {', '.join(NORMS)})"
    if first.model == "mlp3x100" and first.placement != "post_conv":
        return "mlp3x100 supports placement post_conv only"
    return _structure_reason(cfgs)


def _structure_reason(cfgs: list[RunConfig]) -> str | None:
    """Build each distinct (norm, init)'s model (RNG state kept) and look for layers without a
    packed form (norm variants of other classes, Fixup/SkipInit scalars, ...) and for networks
    that cannot share a pack."""
    from bnlab.models import build_model

    seen, models = set(), []
    for c in cfgs:
        key = (c.norm, c.init, repr(c.init_options))
        if key in seen:
            continue
        seen.add(key)
        channels, size = (1, 28) if c.model.startswith("mlp") else (3, 32)
        with torch.random.fork_rng(devices=[]):
            try:
                model = build_model(c.model, 10, norm=c.norm, init=c.init, in_channels=channels,
                                    image_size=size, placement=c.placement, first_k=c.first_k,
                                    norm_options=c.norm_options, init_options=c.init_options)
                check_packable(model)
            except NotPackable as e:
                return f"{e} (init {c.init!r}, norm {c.norm!r})"
            except UserError as e:
                return str(e)
        models.append(model)
    if len(models) > 1:
        try:
            empty_pack(models)
        except NotPackable as e:
            return str(e)
    return None


def pack_groups(cfgs: list[RunConfig], max_k: int = 16) -> list[list[RunConfig]]:
    """Split `cfgs` into packs (lists of 2..max_k packable runs, in input order) and lone
    runs (lists of one). A study runner trains each list of two or more with `train_packed`
    and each single one with its usual executor. Packing pays on GPUs, where one small run
    leaves most of the device idle; on a CPU a grouped convolution costs more per run than K
    plain ones (docs/speed.md), so runners pack CUDA runs only."""
    groups: dict[tuple, list[RunConfig]] = {}
    for c in cfgs:
        key = tuple(repr(getattr(c, n)) for n in FIELDS if n not in PER_RUN)
        groups.setdefault(key, []).append(c)
    out = []
    for members in groups.values():
        if len({c.norm for c in members}) > 1 and can_pack(members[:max_k]) is not None:
            by_norm: dict[str, list[RunConfig]] = {}  # these norms cannot mix: pack apart
            for c in members:
                by_norm.setdefault(c.norm, []).append(c)
            subgroups = list(by_norm.values())
        else:
            subgroups = [members]
        for sub in subgroups:
            for chunk in (sub[i:i + max_k] for i in range(0, len(sub), max_k)):
                if len(chunk) > 1 and can_pack(chunk) is None:
                    out.append(chunk)
                else:
                    out.extend([c] for c in chunk)
    return out


class PackedSGD:
    """torch.optim.SGD (dampening 0) on packed parameters, with per-run hyperparameters:

        d = grad + wd_k * p;   buf = momentum_k * buf + d;   p = p - lr_k * (d + momentum_k *
        buf if nesterov else buf)

    where `_k` is the value of the run owning the entry. A zero buffer makes the first step
    `buf = d`, as torch's buffer creation does. Weight decay follows `train.param_groups`: on
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
    return [[c.lr * lr_factor(c, first_step + i, spe) for c in cfgs] for i in range(steps)]


class _Member:
    """One run of a pack: its config, folder, progress and the state it entered the pack with."""

    def __init__(self, cfg: RunConfig, run: RunDir):
        self.cfg, self.run = cfg, run
        self.epoch, self.step, self.wall = 0, 0, 0.0
        self.metrics: list[dict] = []
        self.flags: dict = {}
        self.model_state = self.bufs = self.template = None
        self.rng_cpu = self.rng_cuda = None
        self.status = "running"
        self.last_lr = cfg.lr


def train_packed(cfgs: list[RunConfig], out: str | Path = "runs", resume: bool = True,
                 log: Callable[[str], None] = print, bundle: DataBundle | None = None
                 ) -> list[dict]:
    """Train `cfgs` as packs into `out/<run_id>/` and return their summaries in order.

    Finished runs are skipped; runs resuming from different epochs train in separate packs;
    streamed (large-image) data falls back to training the runs one after another. A failure
    inside a pack marks each of its runs `failed` (with error.txt) and is not raised.
    """
    reason = can_pack(cfgs) if len(cfgs) > 1 else None
    if reason is not None:
        raise UserError(f"these runs cannot be packed: {reason}")
    store = Store(out)
    members, done = [], {}
    for cfg in cfgs:
        run = store.run(cfg.run_id())
        summary = run.summary or {}
        if run.exists() and not resume:
            raise UserError(f"run {run.run_id!r} already exists in {str(store.root)!r} "
                            f"(status {summary.get('status', 'running')}); pass --resume to "
                            "continue it or --out to start elsewhere")
        if run.exists() and summary.get("status") in FINISHED:
            done[cfg.run_id()] = summary
        else:
            members.append(_Member(cfg, run))
    if members:
        c = members[0].cfg
        if bundle is None:
            bundle = load_data(c.dataset, c.data_dir or None, c.download, c.limit_train,
                               c.limit_test, c.augment)
        if bundle.streamed:
            log("packed training needs in-memory data; training the runs one after another")
            for m in members:
                done[m.cfg.run_id()] = train_run(m.cfg, out, resume=resume, log=log,
                                                 bundle=bundle)
            members = []
    device = resolve_device(members[0].cfg.device) if members else None
    for m in members:
        _enter(m, bundle, device, log)
    by_epoch: dict[int, list[_Member]] = {}
    for m in members:
        by_epoch.setdefault(m.epoch, []).append(m)
    for group in by_epoch.values():
        try:
            _train_pack(group, store, bundle, device, log)
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as e:  # noqa: BLE001 - recorded in each run's folder, as train_run does
            for m in group:
                if m.status == "running":
                    _fail(store, m, e)
        for m in group:
            done[m.cfg.run_id()] = m.run.summary
    return [done[c.run_id()] for c in cfgs]


def _enter(m: _Member, bundle: DataBundle, device: torch.device, log) -> None:
    """Build the run's model as train_run would (same seed, same init) and load its checkpoint."""
    torch.manual_seed(m.cfg.seed)
    model = build_for(m.cfg, bundle)
    m.rng_cpu = torch.get_rng_state()
    m.rng_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        check_packable(model)  # builds layers, so it draws from the RNG: after the capture
    except NotPackable as e:
        raise UserError(f"run {m.run.run_id!r} cannot be packed: {e}") from None
    fmt = memory_format_for(device, m.cfg.model)
    model = model.to(device=device, memory_format=fmt)
    m.template = model
    state = m.run.load_checkpoint(map_location=device) if m.run.exists() else None
    names = [n for n, _ in model.named_parameters()]
    if state is None:
        m.model_state = model.state_dict()
        m.bufs = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        return
    model.load_state_dict(state["model"])
    m.model_state = model.state_dict()
    opt = _single_optimizer(model, m.cfg, m.cfg.lr)
    opt.load_state_dict(state["optimizer"])
    params = dict(model.named_parameters())
    m.bufs = {}
    for n in names:
        buf = opt.state.get(params[n], {}).get("momentum_buffer")
        m.bufs[n] = (torch.zeros_like(params[n]) if buf is None else
                     buf.to(device).contiguous(memory_format=_format_of(params[n])))
    m.epoch, m.step, m.wall = state["epoch"], state["step"], state["wall_time"]
    m.flags = dict(state.get("flags", {}))
    m.rng_cpu = state["rng_cpu"]
    m.rng_cuda = state.get("rng_cuda")
    m.metrics = [r for r in m.run.metrics() if r["epoch"] <= m.epoch]
    log(f"resuming {m.run.run_id} at epoch {m.epoch}/{m.cfg.epochs} (packed)")


def _format_of(p: torch.Tensor):
    if p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _single_optimizer(model: nn.Module, cfg: RunConfig, lr: float) -> torch.optim.SGD:
    """An optimizer of train_run's kind over `model` (whose device decides fused or not), to
    read and write the momentum buffers in the single-run checkpoint format."""
    return make_sgd(model, cfg, lr, next(model.parameters()).device)


def _fail(store: Store, m: _Member, e: BaseException) -> None:
    m.status = "failed"
    m.run.path.mkdir(parents=True, exist_ok=True)
    (m.run.path / "error.txt").write_text("".join(traceback.format_exception(e)))
    m.run.write_json("summary.json", dict(m.run.summary or {}, status="failed",
                                          error=f"{type(e).__name__}: {e}"))
    store.record(m.run)


def _finish(store: Store, m: _Member, status: str) -> None:
    m.status = status
    m.run.write_json("summary.json", _summary(m.cfg, status, m.metrics, m.wall, m.flags))
    store.record(m.run)


class _Pack:
    """The live packed model and optimizer of the members still training."""

    def __init__(self, members: list[_Member], device: torch.device,
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
        bufs = {n: b.contiguous(memory_format=_format_of(params[n])) for n, b in bufs.items()}
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

    def sync_members(self) -> None:
        """Copy each member's current weights and momentum buffers out of the pack."""
        k = len(self.members)
        state = self.model.state_dict()
        for i, m in enumerate(self.members):
            own = dict(m.template.named_parameters())
            m.model_state = unpack_state(state, i, k, m.template.state_dict())
            bufs = unpack_state(self.opt.bufs, i, k, own)
            m.bufs = {n: b.contiguous(memory_format=_format_of(own[n]))
                      for n, b in bufs.items()}


def _batches(members: list[_Member], train: Split, norm: Normalizer, epoch: int, spe: int,
             batch: int, augment: bool, flip: bool, device: torch.device):
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


def _train_pack(members: list[_Member], store: Store, bundle: DataBundle,
                device: torch.device, log) -> None:
    c0 = members[0].cfg
    if device.type == "cpu":
        tune_cpu_allocator()
    use_cpu_kernels(c0.cpu_kernels and device.type == "cpu", log)
    fmt = memory_format_for(device, c0.model)
    train = Split(bundle.train.x.to(device), bundle.train.y.to(device))
    test = Split(bundle.test.x.to(device), bundle.test.y.to(device))
    spe = max(1, len(train.y) // c0.batch_size)
    for m in members:
        if not m.run.exists():
            m.run.path.mkdir(parents=True, exist_ok=True)
            rec = config_record(m.cfg, bundle, m.template, device, spe)
            rec["env"]["packed"] = len(members)
            m.run.write_json("config.json", rec)
            m.run.write_rows("metrics.jsonl", [])
        m.run.write_json("summary.json", _summary(m.cfg, "running", m.metrics, m.wall, m.flags))
        store.record(m.run)
    chance = chance_threshold(bundle.num_classes, len(test.y))
    quarter = max(1, math.ceil(c0.epochs / 4))
    pack = _Pack(members, device, log)
    for epoch in range(members[0].epoch + 1, c0.epochs + 1):
        t0 = time.perf_counter()
        pack, seen, loss_sum, correct = _train_epoch(pack, train, bundle, epoch, spe, fmt,
                                                     device, store, log, t0)
        if not pack.members:
            return
        train_time = time.perf_counter() - t0
        test_loss, test_acc = _evaluate(pack, test, bundle, device, fmt)
        epoch_time = time.perf_counter() - t0
        pack.sync_members()
        k = len(pack.members)
        for i, m in enumerate(pack.members):
            m.wall += epoch_time
            m.epoch = epoch
            row = {"epoch": epoch, "step": m.step, "lr": m.last_lr,
                   "train_loss": loss_sum[i] / seen, "train_acc": correct[i] / seen,
                   "test_loss": test_loss[i], "test_acc": test_acc[i], "epoch_time": epoch_time,
                   "train_images_per_s": seen / train_time, "packed": k}
            m.metrics.append(row)
            if epoch == quarter and row["test_acc"] <= chance:
                m.flags["no_learning_at_epoch"] = epoch
            log(f"{m.run.run_id} epoch {epoch}/{m.cfg.epochs}  train loss "
                f"{row['train_loss']:.4f} acc {row['train_acc']:.4f}  test loss "
                f"{row['test_loss']:.4f} acc {row['test_acc']:.4f}  "
                f"{row['train_images_per_s']:.0f} img/s (packed x{k})")
            m.run.write_rows("metrics.jsonl", m.metrics)
            m.run.save_checkpoint(_member_checkpoint(m, device))
            if epoch < m.cfg.epochs:
                m.run.write_json("summary.json", _summary(m.cfg, "running", m.metrics, m.wall,
                                                          m.flags))
                store.record(m.run)
    for m in pack.members:
        _finish(store, m, "no_learning" if "no_learning_at_epoch" in m.flags else "completed")


def _member_checkpoint(m: _Member, device: torch.device) -> dict:
    """The checkpoint train_run would have written for this run at this point."""
    model = m.template
    model.load_state_dict(m.model_state)
    opt = _single_optimizer(model, m.cfg, m.last_lr)
    if m.cfg.momentum != 0:
        name_of = {id(p): n for n, p in model.named_parameters()}
        for group in opt.param_groups:
            for p in group["params"]:
                opt.state[p] = {"momentum_buffer": m.bufs[name_of[id(p)]]}
    state = _checkpoint(m.cfg, model, opt, m.epoch, m.step, m.wall, m.flags, device)
    # training draws nothing from the global RNGs (dropout is not packable), so a lone run
    # would still hold the states it had right after building its model
    state["rng_cpu"], state["rng_cuda"] = m.rng_cpu, m.rng_cuda
    return state


def _train_epoch(pack: _Pack, train: Split, bundle: DataBundle, epoch: int, spe: int, fmt,
                 device: torch.device, store: Store, log, t0: float):
    """One epoch of every member; a member whose loss turns non-finite stops (status
    diverged) and the others are repacked without it and go on."""
    members = list(pack.members)
    cfgs = [m.cfg for m in members]
    batch = cfgs[0].batch_size
    norm = Normalizer(tuple(bundle.mean) * len(members), tuple(bundle.std) * len(members),
                      device, fmt)
    step0 = members[0].step
    lr_host = lr_rows(cfgs, step0, spe, spe)
    lrs = torch.tensor(lr_host, dtype=torch.float64, device=device)
    keep = list(range(len(members)))  # positions (in `members`) still in the pack
    loss_sum = torch.zeros(len(keep), dtype=torch.float64, device=device)
    correct = torch.zeros(len(keep), dtype=torch.int64, device=device)
    watch = FirstBad(device, (len(keep),))
    seen = 0
    for i, (x, y) in enumerate(_batches(members, train, norm, epoch, spe, batch,
                                        cfgs[0].augment, bundle.flip, device)):
        k = len(keep)
        if k != len(members):
            c = x.shape[1] // len(members)
            x = torch.cat([x[:, j * c:(j + 1) * c] for j in keep], 1).contiguous(
                memory_format=fmt)
            y = y[:, keep]
        mark_step(pack.fast)
        detached, hits = pack.step(x, y, lrs[i, keep] if k != len(members) else lrs[i])
        watch.update(detached, step0 + i)
        loss_sum.add_(detached, alpha=batch)
        correct += hits
        seen += batch
        for j, m in zip(keep, pack.members):
            m.step, m.last_lr = step0 + i + 1, lr_host[i][j]
        bad = watch.poll(i, final=i + 1 == spe)
        if bad is None:
            continue
        gone = [j for j, b in enumerate(bad.tolist()) if b >= 0]
        for j in gone:
            m = pack.members[j]
            m.flags["diverged_step"] = int(bad[j])
            m.wall += time.perf_counter() - t0
            log(f"{m.run.run_id}: loss became non-finite at step {m.flags['diverged_step']}; "
                "stopping (status diverged)")
            _finish(store, m, "diverged")
        stay = [j for j in range(k) if j not in gone]
        if not stay:
            pack.members = []
            return pack, seen, [], []
        pack.sync_members()
        pack = _Pack([pack.members[j] for j in stay], device, log)
        keep = [keep[j] for j in stay]
        loss_sum, correct = loss_sum[stay], correct[stay]
        watch = FirstBad(device, (len(stay),))
    return pack, seen, loss_sum.tolist(), correct.tolist()


@torch.no_grad()
def _evaluate(pack: _Pack, test: Split, bundle: DataBundle, device: torch.device, fmt
              ) -> tuple[list[float], list[float]]:
    """Each member's mean test cross-entropy and accuracy (every run sees the same images)."""
    k = len(pack.members)
    cfg = pack.members[0].cfg
    norm = Normalizer(bundle.mean, bundle.std, device, fmt)
    pack.model.eval()
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    n, eb = len(test.y), cfg.eval_batch_size
    for lo in range(0, n, eb):
        x, y = norm(test.x[lo:lo + eb]), test.y[lo:lo + eb]
        x = x.repeat(1, k, 1, 1).contiguous(memory_format=fmt)
        if cfg.compile:
            x = pad_batch(x, eb)
        with autocast(device, cfg.precision):
            out = pack.fast(x)[: len(y)]
        out = out.float().reshape(len(y), k, -1)
        yk = y[:, None].expand(-1, k)
        loss_sum += F.cross_entropy(out.permute(0, 2, 1), yk, reduction="none").sum(0).double()
        correct += (out.argmax(2) == yk).sum(0)
    pack.model.train()
    return (loss_sum / n).tolist(), (correct.double() / n).tolist()
