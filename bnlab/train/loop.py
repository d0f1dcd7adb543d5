"""One training run, top to bottom: data, model, optimizer, the epoch loop, evaluation, storage.

`train_run(cfg, out)` is the whole story; `train_one_epoch` is one pass over the training data.
A run's folder is created only once its data and model have been built (so a bad config leaves
nothing behind); after every epoch its metrics, summary and checkpoint are replaced atomically
(bnlab.train.record), so a killed run resumes from its last epoch and ends with the same numbers
as one that was never interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnlab.config import RunConfig, require_trained_precision
from bnlab.data import DataBundle, data_for
from bnlab.data.loader import make_loader
from bnlab.errors import DataMismatch, UserError
from bnlab.fast import step_graph
from bnlab.fast.accel import FirstBad, mark_step, prepare
from bnlab.models import build_for
from bnlab.models.norm_summary import norm_note
from bnlab.runtime import autocast, resolve_device
from bnlab.store import Store
from bnlab.train.board import EpochBoard
from bnlab.train.distributed import (
    Context,
    check_probes,
    check_sync_bn,
    convert_sync_bn,
    detect,
    session,
)
from bnlab.train.epoch import EpochResult, epoch_line, epoch_row, prepare_device
from bnlab.train.evaluate import chance_threshold, evaluate_topk
from bnlab.train.optim import lr_factor, make_sgd, peak_lr
from bnlab.train.probe_batch import probe_batch
from bnlab.train.probes import Prober, make_prober
from bnlab.train.record import RunRecord, checkpoint_state, config_record


def train_run(cfg: RunConfig, out: str | Path = "runs", resume: bool = False,
              log: Callable[[str], None] = print, bundle: DataBundle | None = None) -> dict:
    """Train one run into `out/<run_id>/` and return its summary.

    resume=False refuses to touch an existing run folder; resume=True continues it from its
    last checkpoint (or returns its summary at once when it already finished).
    Under torchrun (WORLD_SIZE > 1) every process calls this; see bnlab.train.distributed.
    """
    require_trained_precision(cfg)
    check_probes(cfg.probe_every, detect().world_size)  # before joining the process group
    with session(resolve_device(cfg.device)) as ctx:
        rec, done = _open(cfg, out, resume, ctx)
        if done is not None:  # a finished run is its result only for the data it was run on
            _same_data(rec, ctx, bundle)
            return done
        if cfg.sync_bn:
            check_sync_bn(ctx.device)
        ctx.check_batch(cfg.batch_size)
        bundle = data_for(cfg, bundle)
        _same_data(rec, ctx, bundle)
        torch.manual_seed(cfg.seed)
        model = build_for(cfg, bundle, cpu_kernels=cfg.cpu_kernels and ctx.device.type == "cpu")
        try:
            return _train(rec, model, bundle, ctx, ctx.log(log))
        except (KeyboardInterrupt, UserError):
            raise
        except Exception as e:
            rec.fail(e)  # only rank 0's record writes
            raise


def _open(cfg: RunConfig, out: str | Path, resume: bool,
          ctx: Context) -> tuple[RunRecord, dict | None]:
    """The run's record, and its summary when it has finished already; rank 0 looks at the
    store alone and tells the other processes what it found."""
    rec = RunRecord(Store(out) if ctx.is_main else None, cfg)
    verdict = ctx.from_main(rec.verdict(resume, ctx.env.world_size) if ctx.is_main else None)
    if isinstance(verdict, str):
        raise UserError(verdict)
    return rec, verdict


def _same_data(rec: RunRecord, ctx: Context, bundle: DataBundle | None) -> None:
    """Refuse (on every process) to continue a run with data other than its own
    (RunRecord.check_data; `bundle` None: the data its config names). Rank 0 compares and
    tells the others, which must not wait for it in a collective it never reaches."""
    why = None
    if ctx.is_main:
        try:
            rec.check_data(bundle)
        except DataMismatch as e:
            why = str(e)
    why = ctx.from_main(why)
    if why:
        raise DataMismatch(why)


@dataclass
class Training:
    """What every epoch of a run uses, made once by `_setup`."""

    cfg: RunConfig
    model: nn.Module  # what checkpoints hold
    fast: Callable  # what trains: `model`, its DDP wrapper, or their compiled form
    step_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    opt: torch.optim.Optimizer
    train_loader: object
    test_loader: object
    val_loader: object | None  # the held-out validation images, when val_fraction > 0
    device: torch.device
    ctx: Context
    prober: Prober | None
    board: EpochBoard | None  # TensorBoard output of rank 0 (run option tensorboard)
    lr_now: torch.Tensor | None  # the graphed step reads its learning rate from here
    lr: float  # the learning rate set last

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


def _setup(rec: RunRecord, model: nn.Module, bundle: DataBundle, ctx: Context,
           log: Callable[[str], None]) -> Training:
    """Device, layout, loaders and optimizer; the checkpoint loaded (resume) or the run
    folder begun; probes and the step function."""
    cfg, device = rec.cfg, ctx.device
    fmt = prepare_device(cfg, device, log)
    model = model.to(device=device, memory_format=fmt)
    if cfg.sync_bn:
        model = convert_sync_bn(model, device)
    net = ctx.wrap(model, cfg.sync_bn)
    train_loader = ctx.train_loader(
        make_loader(bundle, True, cfg.batch_size, device, cfg.augment, cfg.seed, cfg.workers,
                    fmt), bundle, cfg.batch_size, cfg.seed, cfg.workers, fmt)
    shard = ctx.eval_bundle(bundle)
    test_loader = make_loader(shard, False, cfg.eval_batch_size, device, False, cfg.seed,
                              cfg.workers, fmt)
    val_loader = None if shard.val is None else make_loader(
        shard, False, cfg.eval_batch_size, device, False, cfg.seed, cfg.workers, fmt,
        split=shard.val)
    opt = make_sgd(model, cfg, peak_lr(cfg), device)

    state = ctx.from_main(rec.load_checkpoint(map_location="cpu") if ctx.is_main else None)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rec.resume_from(state)
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        log(f"resuming {cfg.run_id()} at epoch {rec.epoch}/{cfg.epochs}")
    rec.begin(lambda: {**config_record(cfg, bundle, model, device, len(train_loader)),
                       "distributed": ctx.describe(cfg.batch_size, cfg.sync_bn)})
    note = norm_note(model, cfg.norm, cfg.norm_options)
    if note and ctx.is_main:
        log(note)
    if ctx.banner(cfg.batch_size, cfg.sync_bn):
        log(ctx.banner(cfg.batch_size, cfg.sync_bn))

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # probes (bnlab/train/probes.py): None when off; they never change the trajectory
    prober = None
    if cfg.probe_every:
        batch = probe_batch(bundle, cfg.probe_images, device, fmt)
        prober = make_prober(cfg, model, opt, criterion, rec.run, rec.epoch, rec.step, batch)
        where = batch.describe() if batch else "each probe step's own training batch"
        log(f"probes every {cfg.probe_every} steps; activations on {where}")
    graphed = (cfg.cuda_graph and step_graph.supported(device) and prober is None
               and not ctx.env.enabled and not (cfg.compile and cfg.dropout > 0))
    fast = prepare(net, device, cfg.compile, whole_step_graph=graphed)
    lr_now = torch.full((), peak_lr(cfg), dtype=torch.float32, device=device) if graphed else None

    def train_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sgd_step(fast, model, opt, criterion, cfg, device, prober, x, y,
                        cache=not graphed)

    step_fn = step_graph.StepGraph(train_step, device, log=log) if graphed else train_step
    if graphed:  # the graph reads the learning rate from a device tensor
        for g in opt.param_groups:
            g["lr"] = lr_now
    return Training(cfg, model, fast, step_fn, opt, train_loader, test_loader, val_loader,
                    device, ctx, prober, rec.board, lr_now, peak_lr(cfg))


def sgd_step(net: Callable, model: nn.Module, opt: torch.optim.Optimizer, criterion,
             cfg: RunConfig, device: torch.device, prober: Prober | None, x: torch.Tensor,
             y: torch.Tensor, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward (through `net`: the model or its wrapped or compiled form), loss, backward and
    update of `model` on one batch: (loss, correct predictions). The one training step of a
    lone run, also taken by a probed run of a pack at its probe steps (bnlab.train.packed)."""
    opt.zero_grad(set_to_none=True)
    with autocast(device, cfg.precision, cache=cache):
        out = net(x)
        loss = criterion(out.float(), y)
    loss.backward()
    if prober is not None:
        prober.gradients_ready()  # probes read the gradient before clipping
    if cfg.grad_clip:  # after DDP's all-reduce, so every process clips the same norm
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.detach(), (out.detach().argmax(1) == y).sum()


def train_one_epoch(t: Training, epoch: int, step: int) -> EpochResult:
    """One pass over the training batches of `epoch`, starting at optimizer step `step`.

    The learning rate follows the schedule step by step; a non-finite loss stops the epoch
    (the step is in the result). Loss and accuracy are sums over the global batch."""
    cfg, device, ctx = t.cfg, t.device, t.ctx
    t0 = time.perf_counter()
    t.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    watch = FirstBad(device)
    seen = 0
    spe = t.steps_per_epoch
    for i, (x, y) in enumerate(t.train_loader.epoch(epoch)):
        new_lr = peak_lr(cfg) * lr_factor(cfg, step, spe)
        if t.lr_now is None:
            for g in t.opt.param_groups:
                g["lr"] = new_lr
        elif new_lr != t.lr:  # one fill when the schedule moves, none otherwise
            t.lr_now.fill_(new_lr)
        t.lr = new_lr
        if t.prober is not None:
            t.prober.start(step, epoch, x, y)
        mark_step(t.fast)
        detached, hits = t.step_fn(x, y)
        ctx.average_buffers(t.model)  # running statistics over all shards (distributed.py)
        watch.update(detached, step)
        if t.board is not None and epoch == 1:  # step losses of the first epoch (board.py)
            t.board.add_step(step, float(detached))
        loss_sum.add_(detached, alpha=len(y))  # one kernel, summed in float64
        correct += hits
        seen += len(y)
        step += 1
        if ctx.env.enabled:  # every process must stop at the same step
            bad = None
            if (i + 1) % watch.every == 0 or i + 1 == spe:
                ctx.max_(watch.flag)
                bad = int(watch.flag) if int(watch.flag) >= 0 else None
        else:
            bad = watch.poll(i, final=i + 1 == spe)
        if bad is not None:
            return EpochResult(seconds=time.perf_counter() - t0, step=step, lr=t.lr,
                               diverged_step=int(bad))
    seconds = time.perf_counter() - t0
    seen_t = torch.tensor(float(seen), dtype=torch.float64, device=device)
    ctx.sum_(loss_sum, correct, seen_t)  # over the global batch
    seen = int(seen_t)
    return EpochResult(float(loss_sum) / seen, int(correct) / seen, seen, seconds, step, t.lr)


def _train(rec: RunRecord, model: nn.Module, bundle: DataBundle, ctx: Context,
           log: Callable[[str], None]) -> dict:
    t = _setup(rec, model, bundle, ctx, log)
    cfg = rec.cfg
    chance = chance_threshold(bundle.num_classes, len(bundle.test))
    for epoch in range(rec.epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        res = train_one_epoch(t, epoch, rec.step)
        if res.diverged_step is not None:
            rec.diverged(res.diverged_step, time.perf_counter() - t0, log)
            break
        pad = cfg.eval_batch_size if cfg.compile else None
        ev = evaluate_topk(t.fast, t.test_loader, t.device, cfg.precision, ctx, pad)
        val = None if t.val_loader is None else evaluate_topk(
            t.fast, t.val_loader, t.device, cfg.precision, ctx, pad)
        row = epoch_row(epoch, res, ev, val, time.perf_counter() - t0)
        rec.add_epoch(row, chance)
        if t.prober is not None:
            t.prober.flush()
        rec.save(checkpoint_state(cfg, t.model, t.opt, epoch, rec.step, rec.wall, rec.flags,
                                  t.device))
        log(epoch_line(cfg.run_id(), cfg.epochs, row))
        if "test_loss_nonfinite_epoch" in rec.flags:
            log(f"{cfg.run_id()}: test loss non-finite after epoch {epoch} (train loss "
                f"{row.train_loss:.3g}); stopping (status diverged)")
            break
    if t.prober is not None:
        t.prober.close()
    summary = rec.finish(chance)
    ctx.barrier()  # no process leaves before rank 0 has written the result
    return summary
