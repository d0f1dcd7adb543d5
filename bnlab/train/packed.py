"""Packed runs: K runs of one study trained at once as one grouped network (bnlab.models.grouped).

Each run keeps everything a run trained alone has: its own initialization (built from its own
seed exactly as `train_run` builds it), its own data order and augmentation (its own
`epoch_plan`), its own BN statistics (its own channels), its own SGD momentum, learning rate,
schedule and weight decay, its own divergence handling (a diverging run stops; the others are
repacked without it and go on), and its own run folder with the same files `train_run` writes,
so status, reports and resume cannot tell a packed run from a lone one. A packed run can be
resumed alone, and a lone run's checkpoint can join a pack. A run with probes is probed on
its own network at its probe steps (bnlab.train.pack_model.MemberProbe) and stays in the pack.

What trains together: bnlab.train.packing (can_pack, pack_groups); the pack's network,
optimizer, batches and checkpoints: bnlab.train.pack_model; here: the epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from bnlab.config import RunConfig, require_trained_precision
from bnlab.data import DataBundle, Split, data_for
from bnlab.data.loader import Normalizer
from bnlab.errors import DataMismatch, StorageError, UserError
from bnlab.fast.accel import FirstBad, mark_step, memory_format_for
from bnlab.models import build_for
from bnlab.models.grouped import NotPackable, check_packable
from bnlab.runtime import resolve_device
from bnlab.store import Store
from bnlab.train.epoch import EpochResult, epoch_line, epoch_row, prepare_device
from bnlab.train.evaluate import chance_threshold
from bnlab.train.loop import train_run
from bnlab.train.optim import lr_rows, single_optimizer
from bnlab.train.pack_model import (
    Member,
    MemberProbe,
    Pack,
    evaluate_pack,
    format_of,
    member_checkpoint,
    packed_batches,
)
from bnlab.train.packing import PER_RUN, SHARED, can_pack, pack_groups
from bnlab.train.probe_batch import probe_batch
from bnlab.train.record import RunRecord, config_record, error_message

__all__ = ["PER_RUN", "SHARED", "can_pack", "pack_groups", "train_pack_epoch", "train_packed"]


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
    for cfg in cfgs:
        require_trained_precision(cfg)
    reason = can_pack(cfgs) if len(cfgs) > 1 else None
    if reason is not None:
        raise UserError(f"these runs cannot be packed: {reason}")
    store = Store(out)
    members, done, refused = [], {}, {}
    for cfg in cfgs:
        m = Member(cfg, store)
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
    by_epoch: dict[int, list[Member]] = {}
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


def _fail(m: Member, e: Exception, log: Callable[[str], None]) -> dict:
    m.status = "failed"
    log(f"{m.rec.run_id}: failed: {error_message(e)}")
    return m.rec.fail(e)


def _enter(m: Member, bundle: DataBundle, device: torch.device, log) -> None:
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
                     buf.to(device).contiguous(memory_format=format_of(params[n])))
    m.rec.resume_from(state)
    m.rng_cpu = state["rng_cpu"]
    m.rng_cuda = state.get("rng_cuda")
    log(f"resuming {m.rec.run_id} at epoch {m.rec.epoch}/{m.cfg.epochs} (packed)")


def _train_pack(members: list[Member], bundle: DataBundle, device: torch.device,
                log: Callable[[str], None]) -> None:
    """The epochs of one pack (members that resume from the same epoch): the lone loop's
    skeleton (bnlab.train.loop._train) with K runs per step and one record per run."""
    c0 = members[0].cfg
    fmt = prepare_device(c0, device, log)
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
        if m.cfg.probe_every:
            # activations on the run's fixed probe batch, as a lone run measures them
            m.probe = MemberProbe(m, device, probe_batch(bundle, m.cfg.probe_images, device, fmt))
    chance = chance_threshold(bundle.num_classes, len(test.y))
    pack = Pack(members, device, log)
    for epoch in range(members[0].rec.epoch + 1, c0.epochs + 1):
        t0 = time.perf_counter()
        pack, results = train_pack_epoch(pack, train, bundle, epoch, spe, fmt, log)
        if not pack.members:
            return
        tests = evaluate_pack(pack, test, bundle, device, fmt)
        k = len(pack.members)
        vals = evaluate_pack(pack, val, bundle, device, fmt) if val is not None else None
        epoch_time = time.perf_counter() - t0
        pack.sync_members()
        for i, (m, res) in enumerate(zip(pack.members, results)):
            row = epoch_row(epoch, res, tests[i], None if vals is None else vals[i],
                            epoch_time, packed=k)
            m.rec.add_epoch(row, chance)
            if m.probe is not None:
                m.probe.prober.flush()
            m.rec.save(member_checkpoint(m, device))
            log(epoch_line(m.rec.run_id, m.cfg.epochs, row))
    for m in pack.members:
        m.stop(m.rec.finish(chance)["status"])


def train_pack_epoch(pack: Pack, train: Split, bundle: DataBundle, epoch: int, spe: int, fmt,
                     log: Callable[[str], None]) -> tuple[Pack, list[EpochResult]]:
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
    for i, (x, y) in enumerate(packed_batches(members, train, norm, epoch, spe, batch,
                                              cfgs[0].augment, bundle.flip, device)):
        k = len(keep)
        if k != len(members):
            c = x.shape[1] // len(members)
            x = torch.cat([x[:, j * c:(j + 1) * c] for j in keep], 1).contiguous(
                memory_format=fmt)
            y = y[:, keep]
        for p, m in enumerate(pack.members):  # probes first: they read W_t of this step
            if m.probe is not None and m.probe.due(step0 + i):
                c = x.shape[1] // k
                m.probe.take(pack, p, step0 + i, epoch, lr_host[i][keep[p]],
                             x[:, p * c:(p + 1) * c].contiguous(memory_format=fmt),
                             y[:, p].contiguous())
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
            m.stop(m.rec.finish()["status"])
        stay = [j for j in range(k) if j not in gone]
        if not stay:
            pack.members = []
            return pack, []
        pack.sync_members()
        pack = Pack([pack.members[j] for j in stay], device, log)
        keep = [keep[j] for j in stay]
        loss_sum, correct = loss_sum[stay], correct[stay]
        watch = FirstBad(device, (len(stay),))
    seconds = time.perf_counter() - t0
    return pack, [EpochResult(loss / seen, acc / seen, seen, seconds, step0 + spe, m.last_lr)
                  for m, loss, acc in zip(pack.members, loss_sum.tolist(), correct.tolist())]
