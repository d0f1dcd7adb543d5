"""Packed runs: K runs of one study trained at once as one grouped network (bnlab.models.grouped).

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

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bnlab.config import FIELDS, RunConfig
from bnlab.data import DataBundle, Split, data_for, loader
from bnlab.data.loader import Normalizer, crop_flip, epoch_plan
from bnlab.errors import DataMismatch, StorageError, UserError
from bnlab.fast import step_graph
from bnlab.fast.accel import (
    FirstBad,
    mark_step,
    memory_format_for,
    pad_batch,
    prepare,
    tune_cpu_allocator,
)
from bnlab.fast.cpu_kernels import use_cpu_kernels
from bnlab.models import build_for, build_model
from bnlab.models.cifar_resnet import DEPTHS, PLAIN_DEPTHS
from bnlab.models.grouped import (
    NotPackable,
    check_packable,
    empty_pack,
    owned_entries,
    pack_state,
    unpack_state,
    zero_fill,
)
from bnlab.models.vgg import CONFIGS
from bnlab.norm import PACKABLE_NORMS
from bnlab.runtime import autocast, resolve_device
from bnlab.store import Store
from bnlab.train.evaluate import batch_sums, chance_threshold
from bnlab.train.loop import EpochResult, train_run
from bnlab.train.optim import PackedSGD, lr_rows, single_optimizer
from bnlab.train.record import RunRecord, checkpoint_state, config_record, error_message

PER_RUN = ("seed", "norm", "init", "init_options", "lr", "momentum", "weight_decay",
           "decay_norm_and_bias", "schedule", "warmup_epochs", "tensorboard")
# fields that may be anything as long as it is the same for every run of the pack
SHARED = ("dataset", "data_dir", "download", "limit_train", "limit_test", "val_fraction",
          "augment", "model", "norm_options", "placement", "first_k", "batch_size", "epochs",
          "label_smoothing", "nesterov", "device", "precision", "eval_batch_size", "workers",
          "compile", "cuda_graph", "cpu_kernels")
PACKABLE_MODELS = (*DEPTHS, *PLAIN_DEPTHS, *CONFIGS, "mlp3x100")


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
    if first.model.startswith("torchvision:") or first.model in ("resnet18", "resnet50"):
        return (f"model {first.model!r} is not packable: the grouped network is built and "
                "tested for bnlab's own models, not for torchvision's block types (packable: "
                f"{', '.join(PACKABLE_MODELS)})")
    if first.model not in PACKABLE_MODELS:
        return f"model {first.model!r} is not packable (packable: {', '.join(PACKABLE_MODELS)})"
    for c in cfgs:
        if c.norm not in PACKABLE_NORMS:
            return f"norm {c.norm!r} is not packable (packable: {', '.join(PACKABLE_NORMS)})"
    if first.model == "mlp3x100" and first.placement != "post_conv":
        return "mlp3x100 supports placement post_conv only"
    return _structure_reason(cfgs)


def _structure_reason(cfgs: list[RunConfig]) -> str | None:
    """Build each distinct (norm, init)'s model (RNG state kept) and look for layers without a
    packed form (norm variants of other classes, Fixup/SkipInit scalars, ...) and for networks
    that cannot share a pack."""
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
    out: list[list[RunConfig]] = []
    alone: dict[tuple, bool] = {}  # a network that cannot be packed at all trains alone ...
    for c in cfgs:
        net = (c.model, c.norm, c.init, repr(c.init_options), c.placement, c.first_k,
               repr(c.norm_options))
        if net not in alone:
            alone[net] = _structure_reason([c]) is not None
        if alone[net]:  # ... and does not stop the others of its group from packing
            out.append([c])
            continue
        key = tuple(repr(getattr(c, n)) for n in FIELDS if n not in PER_RUN)
        groups.setdefault(key, []).append(c)
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


class _Member:
    """One run of a pack: its record (progress and folder) and the state it entered the pack
    with. `store=None` keeps the record in memory only."""

    def __init__(self, cfg: RunConfig, store: Store | None):
        self.rec = RunRecord(store, cfg)
        self.model_state = self.bufs = self.template = None
        self.rng_cpu = self.rng_cuda = None
        self.status = "running"
        self.last_lr = cfg.lr

    @property
    def cfg(self) -> RunConfig:
        return self.rec.cfg


def train_packed(cfgs: list[RunConfig], out: str | Path = "runs", resume: bool = True,
                 log: Callable[[str], None] = print, bundle: DataBundle | None = None
                 ) -> list[dict]:
    """Train `cfgs` as packs into `out/<run_id>/` and return their summaries in order.

    Finished runs are skipped; runs resuming from different epochs train in separate packs;
    streamed (large-image) data falls back to training the runs one after another. A problem
    of one run (a run that cannot join the pack, a checkpoint that does not fit its model,
    another world size on resume) marks that run `failed` (with error.txt), and a failure
    inside a pack each of its runs, as `train_run` records a lone run's failure; the others go
    on. Raised: UserError for the call itself (runs that cannot be packed together, an existing
    run without `resume`), and what stops a study: StorageError, DataMismatch (a stored run
    trained on other data; checked for every run before any trains), KeyboardInterrupt.
    """
    reason = can_pack(cfgs) if len(cfgs) > 1 else None
    if reason is not None:
        raise UserError(f"these runs cannot be packed: {reason}")
    store = Store(out)
    members, done, refused = [], {}, {}
    for cfg in cfgs:
        m = _Member(cfg, store)
        verdict = m.rec.verdict(resume)
        if isinstance(verdict, str) and not resume:  # the call's mistake: nothing is touched
            raise UserError(verdict)
        if isinstance(verdict, str):  # this run's own (another world size), as train_run's
            refused[cfg.run_id()] = (m, UserError(verdict))
        elif verdict is not None:
            done[cfg.run_id()] = verdict
        else:
            members.append(m)
    if members:
        bundle = data_for(members[0].cfg, bundle)
    for cfg in cfgs:  # a finished run, too, is its result only for the data it was run on
        RunRecord(store, cfg).check_data(bundle)
    for m, e in refused.values():
        done[m.cfg.run_id()] = _fail(m, e, log)
    if members and bundle.streamed:
        log("packed training needs in-memory data; training the runs one after another")
        for m in members:
            try:
                done[m.cfg.run_id()] = train_run(m.cfg, out, resume=resume, log=log,
                                                 bundle=bundle)
            except _STOP:
                raise
            except Exception as e:  # noqa: BLE001 - as inside a pack: recorded, the rest go on
                done[m.cfg.run_id()] = _fail(m, e, log)
        members = []
    device = resolve_device(members[0].cfg.device) if members else None
    entered = []
    for m in members:
        try:
            _enter(m, bundle, device, log)
        except _STOP:
            raise
        except Exception as e:  # noqa: BLE001 - this run's problem, recorded; the rest go on
            done[m.cfg.run_id()] = _fail(m, e, log)
        else:
            entered.append(m)
    by_epoch: dict[int, list[_Member]] = {}
    for m in entered:
        by_epoch.setdefault(m.rec.epoch, []).append(m)
    for group in by_epoch.values():
        try:
            _train_pack(group, bundle, device, log)
        except _STOP:
            raise
        except Exception as e:  # noqa: BLE001 - recorded in each run's folder, as train_run does
            for m in group:
                if m.status == "running":
                    _fail(m, e, log)
        for m in group:
            done[m.cfg.run_id()] = m.rec.run.summary
    return [done[c.run_id()] for c in cfgs]


# what stops a study rather than failing a run (bnlab.study.worker)
_STOP = (KeyboardInterrupt, StorageError, DataMismatch)


def _fail(m: _Member, e: Exception, log: Callable[[str], None]) -> dict:
    m.status = "failed"
    log(f"{m.rec.run_id}: failed: {error_message(e)}")
    return m.rec.fail(e)


def _enter(m: _Member, bundle: DataBundle, device: torch.device, log) -> None:
    """Build the run's model as train_run would (same seed, same init) and load its checkpoint."""
    torch.manual_seed(m.cfg.seed)
    model = build_for(m.cfg, bundle, cpu_kernels=m.cfg.cpu_kernels and device.type == "cpu")
    m.rng_cpu = torch.get_rng_state()
    m.rng_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        check_packable(model)  # builds layers, so it draws from the RNG: after the capture
    except NotPackable as e:
        raise UserError(f"run {m.rec.run_id!r} cannot be packed: {e}") from None
    fmt = memory_format_for(device, m.cfg.model)
    model = model.to(device=device, memory_format=fmt)
    m.template = model
    state = m.rec.load_checkpoint(map_location=device)
    names = [n for n, _ in model.named_parameters()]
    if state is None:
        m.model_state = model.state_dict()
        m.bufs = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        return
    model.load_state_dict(state["model"])
    m.model_state = model.state_dict()
    opt = single_optimizer(model, m.cfg, m.cfg.lr)
    opt.load_state_dict(state["optimizer"])
    params = dict(model.named_parameters())
    m.bufs = {}
    for n in names:
        buf = opt.state.get(params[n], {}).get("momentum_buffer")
        m.bufs[n] = (torch.zeros_like(params[n]) if buf is None else
                     buf.to(device).contiguous(memory_format=_format_of(params[n])))
    m.rec.resume_from(state)
    m.rng_cpu = state["rng_cpu"]
    m.rng_cuda = state.get("rng_cuda")
    log(f"resuming {m.rec.run_id} at epoch {m.rec.epoch}/{m.cfg.epochs} (packed)")


def _format_of(p: torch.Tensor):
    if p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


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


def _train_pack(members: list[_Member], bundle: DataBundle, device: torch.device,
                log: Callable[[str], None]) -> None:
    """The epochs of one pack (members that resume from the same epoch): the lone loop's
    skeleton (bnlab.train.loop._train) with K runs per step and one record per run."""
    c0 = members[0].cfg
    if device.type == "cpu":
        tune_cpu_allocator()
    use_cpu_kernels(c0.cpu_kernels and device.type == "cpu", log)
    fmt = memory_format_for(device, c0.model)
    train = Split(bundle.train.x.to(device), bundle.train.y.to(device))
    test = Split(bundle.test.x.to(device), bundle.test.y.to(device))
    val = None if bundle.val is None else Split(bundle.val.x.to(device), bundle.val.y.to(device))
    spe = max(1, len(train.y) // c0.batch_size)
    for m in members:
        def config(m=m) -> dict:
            rec = config_record(m.cfg, bundle, m.template, device, spe)
            rec["env"]["packed"] = len(members)
            return rec
        m.rec.begin(config)
    chance = chance_threshold(bundle.num_classes, len(test.y))
    pack = _Pack(members, device, log)
    for epoch in range(members[0].rec.epoch + 1, c0.epochs + 1):
        t0 = time.perf_counter()
        pack, results = train_pack_epoch(pack, train, bundle, epoch, spe, fmt, log)
        if not pack.members:
            return
        tests = _evaluate(pack, test, bundle, device, fmt)
        k = len(pack.members)
        vals = _evaluate(pack, val, bundle, device, fmt) if val is not None else None
        epoch_time = time.perf_counter() - t0
        pack.sync_members()
        for i, (m, res) in enumerate(zip(pack.members, results)):
            row = {"epoch": epoch, "step": res.step, "lr": res.lr,
                   "train_loss": res.train_loss, "train_acc": res.train_acc,
                   "test_loss": tests[i]["loss"], "test_acc": tests[i]["acc"],
                   "test_acc5": tests[i]["acc5"]}
            if vals is not None:
                row |= {"val_loss": vals[i]["loss"], "val_acc": vals[i]["acc"]}
            row |= {"epoch_time": epoch_time, "train_images_per_s": res.images / res.seconds,
                    "packed": k}
            m.rec.add_epoch(row, chance)
            log(f"{m.rec.run_id} epoch {epoch}/{m.cfg.epochs}  train loss "
                f"{row['train_loss']:.4f} acc {row['train_acc']:.4f}  test loss "
                f"{row['test_loss']:.4f} acc {row['test_acc']:.4f}  "
                f"{row['train_images_per_s']:.0f} img/s (packed x{k})")
            m.rec.save(_member_checkpoint(m, device))
    for m in pack.members:
        m.status = m.rec.finish(chance)["status"]


def _member_checkpoint(m: _Member, device: torch.device) -> dict:
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
    # training draws nothing from the global RNGs (dropout is not packable), so a lone run
    # would still hold the states it had right after building its model
    state["rng_cpu"], state["rng_cuda"] = m.rng_cpu, m.rng_cuda
    return state


def train_pack_epoch(pack: _Pack, train: Split, bundle: DataBundle, epoch: int, spe: int, fmt,
                     log: Callable[[str], None]) -> tuple[_Pack, list[EpochResult]]:
    """One epoch of every member (train_one_epoch for K runs at once): the pack that is left
    and one EpochResult per member still in it. A member whose loss turns non-finite stops
    (status diverged) and the others are repacked without it and go on."""
    t0 = time.perf_counter()
    device = pack.device
    members = list(pack.members)
    cfgs = [m.cfg for m in members]
    batch = cfgs[0].batch_size
    norm = Normalizer(tuple(bundle.mean) * len(members), tuple(bundle.std) * len(members),
                      device, fmt)
    step0 = members[0].rec.step
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
            m.last_lr = lr_host[i][j]
        bad = watch.poll(i, final=i + 1 == spe)
        if bad is None:
            continue
        gone = [j for j, b in enumerate(bad.tolist()) if b >= 0]
        for j in gone:
            m = pack.members[j]
            m.rec.diverged(int(bad[j]), time.perf_counter() - t0, log)
            m.status = m.rec.finish()["status"]
        stay = [j for j in range(k) if j not in gone]
        if not stay:
            pack.members = []
            return pack, []
        pack.sync_members()
        pack = _Pack([pack.members[j] for j in stay], device, log)
        keep = [keep[j] for j in stay]
        loss_sum, correct = loss_sum[stay], correct[stay]
        watch = FirstBad(device, (len(stay),))
    seconds = time.perf_counter() - t0
    return pack, [EpochResult(loss / seen, acc / seen, seen, seconds, step0 + spe, m.last_lr)
                  for m, loss, acc in zip(pack.members, loss_sum.tolist(), correct.tolist())]


@torch.no_grad()
def _evaluate(pack: _Pack, test: Split, bundle: DataBundle, device: torch.device, fmt
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
