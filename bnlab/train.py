"""One training run, top to bottom: data, model, optimizer, the epoch loop, evaluation, storage.

`train_run(cfg, out)` is the whole story. A run's folder is created only once its data and
model have been built (so a bad config leaves nothing behind); after every epoch its metrics,
summary and checkpoint are replaced atomically, so a killed run resumes from its last epoch and
ends with the same numbers as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import math
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab import step_graph
from bnlab.accel import (
    FirstBad,
    mark_step,
    memory_format_for,
    pad_batch,
    prepare,
    tune_cpu_allocator,
)
from bnlab.config import RunConfig
from bnlab.cpu_kernels import describe as cpu_kernels_state
from bnlab.cpu_kernels import use_cpu_kernels
from bnlab.data import DataBundle, load_data
from bnlab.data.loader import make_loader
from bnlab.distributed import Context, check_sync_bn, convert_sync_bn, session
from bnlab.errors import UserError
from bnlab.models import build_model, count_parameters
from bnlab.probes import make_prober
from bnlab.store import RunDir, Store


# -- pieces ------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is available; accepted here: "
                        "auto, cpu")
    return torch.device(name)


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


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast (or nothing for fp32); cache=False inside a CUDA graph capture, whose
    weights' bf16 copies must be made by the graph itself every step."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


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


def environment(device: torch.device) -> dict:
    env = {
        "bnlab": bnlab.__version__, "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cpu_kernels": cpu_kernels_state() if device.type == "cpu" else None,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
    }
    try:
        root = Path(bnlab.__file__).resolve().parent.parent
        env["git_commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def build_for(cfg: RunConfig, bundle: DataBundle) -> nn.Module:
    return build_model(cfg.model, bundle.num_classes, norm=cfg.norm, init=cfg.init,
                       in_channels=bundle.in_channels, image_size=bundle.image_size,
                       placement=cfg.placement, first_k=cfg.first_k, dropout=cfg.dropout,
                       norm_options=cfg.norm_options, init_options=cfg.init_options)


def config_record(cfg: RunConfig, bundle: DataBundle, model: nn.Module, device: torch.device,
                  steps_per_epoch: int) -> dict:
    """The content of a run's config.json."""
    return {
        "config": cfg.to_dict(), "env": environment(device),
        "data": {"name": bundle.name, "classes": bundle.classes, "n_train": len(bundle.train),
                 "n_test": len(bundle.test), "image_size": bundle.image_size,
                 "mean": bundle.mean, "std": bundle.std, "streamed": bundle.streamed},
        "model": {"parameters": count_parameters(model), "steps_per_epoch": steps_per_epoch}}


# -- the run -----------------------------------------------------------------------------------
def train_run(cfg: RunConfig, out: str | Path = "runs", resume: bool = False,
              log: Callable[[str], None] = print, bundle: DataBundle | None = None) -> dict:
    """Train one run into `out/<run_id>/` and return its summary.

    resume=False refuses to touch an existing run folder; resume=True continues it from its
    last checkpoint (or returns its summary at once when it already finished).
    Under torchrun (WORLD_SIZE > 1) every process calls this; see bnlab.distributed.
    """
    with session(resolve_device(cfg.device)) as ctx:
        return _run(cfg, out, resume, log, bundle, ctx)


def _run(cfg: RunConfig, out: str | Path, resume: bool, log: Callable[[str], None],
         bundle: DataBundle | None, ctx: Context) -> dict:
    store, run, done = _open(cfg, out, resume, ctx)  # store and run: rank 0 only
    if done is not None:
        return done
    device = ctx.device
    if cfg.sync_bn:
        check_sync_bn(device)
    ctx.check_batch(cfg.batch_size)
    if bundle is None:
        bundle = load_data(cfg.dataset, cfg.data_dir or None, cfg.download, cfg.limit_train,
                           cfg.limit_test, cfg.augment, cfg.image_size)
    torch.manual_seed(cfg.seed)
    model = build_for(cfg, bundle)
    try:
        return _train(cfg, store, run, model, bundle, device, ctx.log(log), ctx)
    except KeyboardInterrupt:
        raise
    except UserError:
        raise
    except Exception as e:
        if run is not None:
            summary = dict(run.summary or {}, status="failed", error=f"{type(e).__name__}: {e}")
            run.path.mkdir(parents=True, exist_ok=True)
            (run.path / "error.txt").write_text(traceback.format_exc())
            run.write_json("summary.json", summary)
            store.record(run)
        raise


def _open(cfg: RunConfig, out: str | Path, resume: bool, ctx: Context):
    """(store, run, summary to return at once or None); rank 0 looks at the store alone and
    tells the other processes what it found."""
    store = run = verdict = None
    if ctx.is_main:
        store = Store(out)
        run = store.run(cfg.run_id())
        verdict = _existing(cfg, store, run, resume, ctx)
    verdict = ctx.from_main(verdict)
    if isinstance(verdict, str):
        raise UserError(verdict)
    return store, run, verdict


def _existing(cfg: RunConfig, store: Store, run: RunDir, resume: bool,
              ctx: Context) -> dict | str | None:
    """None to train, a finished run's summary to return, or the message of a UserError."""
    if not run.exists():
        return None
    summary = run.summary or {}
    if not resume:
        return (f"run {run.run_id!r} already exists in {str(store.root)!r} "
                f"(status {summary.get('status', 'running')}); pass --resume to "
                "continue it or --out to start elsewhere")
    if summary.get("status") in ("completed", "diverged", "no_learning"):
        return summary
    world = (run.read_json("config.json").get("distributed") or {}).get("world_size", 1)
    if world != ctx.env.world_size:
        return (f"run {run.run_id!r} was trained by {world} process(es); resume it with "
                f"{world} (the per-device batch, and so BN, depends on it), not "
                f"{ctx.env.world_size}")
    return None


def _train(cfg: RunConfig, store: Store | None, run: RunDir | None, model: nn.Module,
           bundle: DataBundle, device: torch.device, log: Callable[[str], None],
           ctx: Context) -> dict:
    main = ctx.is_main  # only rank 0 writes (store and run are None elsewhere)
    if device.type == "cpu":
        tune_cpu_allocator()
    use_cpu_kernels(cfg.cpu_kernels and device.type == "cpu", log)
    fmt = memory_format_for(device, cfg.model)
    model = model.to(device=device, memory_format=fmt)
    if cfg.sync_bn:
        model = convert_sync_bn(model, device)
    net = ctx.wrap(model, cfg.sync_bn)  # trains; `model` is what checkpoints hold
    train_loader = ctx.train_loader(
        make_loader(bundle, True, cfg.batch_size, device, cfg.augment, cfg.seed, cfg.workers,
                    fmt), bundle, cfg.batch_size, cfg.seed, cfg.workers, fmt)
    test_loader = make_loader(ctx.eval_bundle(bundle), False, cfg.eval_batch_size, device,
                              False, cfg.seed, cfg.workers, fmt)
    opt = make_sgd(model, cfg, peak_lr(cfg), device)
    steps_per_epoch = len(train_loader)
    n_test = len(bundle.test)

    start_epoch, step, wall, metrics, flags = 0, 0, 0.0, [], {}
    state = run.load_checkpoint(map_location="cpu") if main and run.exists() else None
    state = ctx.from_main(state)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, step, wall = state["epoch"], state["step"], state["wall_time"]
        flags = dict(state.get("flags", {}))
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        metrics = [m for m in run.metrics() if m["epoch"] <= start_epoch] if main else []
        log(f"resuming {cfg.run_id()} at epoch {start_epoch}/{cfg.epochs}")
    elif main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_json("config.json", {
            **config_record(cfg, bundle, model, device, steps_per_epoch),
            "distributed": ctx.describe(cfg.batch_size, cfg.sync_bn)})
        run.write_rows("metrics.jsonl", [])
    if main:
        run.write_json("summary.json", _summary(cfg, "running", metrics, wall, flags))
        store.record(run)
    if ctx.banner(cfg.batch_size, cfg.sync_bn):
        log(ctx.banner(cfg.batch_size, cfg.sync_bn))

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # probes (bnlab/probes.py): None when off; they never change the trajectory
    # under data-parallel training rank 0 probes its own shard
    prober = (make_prober(cfg, model, opt, criterion, run, start_epoch)
              if cfg.probe_every and main else None)
    graphed = (cfg.cuda_graph and step_graph.supported(device) and prober is None
               and not ctx.env.enabled and not (cfg.compile and cfg.dropout > 0))
    # `net` itself unless cfg.compile
    fast = prepare(net, device, cfg.compile, whole_step_graph=graphed)
    lr_now = torch.full((), peak_lr(cfg), dtype=torch.float32, device=device) if graphed else None

    def train_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward and update on one batch: (loss, correct predictions)."""
        opt.zero_grad(set_to_none=True)
        with autocast(device, cfg.precision, cache=not graphed):
            out = fast(x)
            loss = criterion(out.float(), y)
        loss.backward()
        if cfg.grad_clip:  # after DDP's all-reduce, so every process clips the same norm
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return loss.detach(), (out.detach().argmax(1) == y).sum()

    step_fn = step_graph.StepGraph(train_step, device, log=log) if graphed else train_step
    if graphed:  # the graph reads the learning rate from a device tensor (set below)
        for g in opt.param_groups:
            g["lr"] = lr_now
    watch = FirstBad(device)
    chance = chance_threshold(bundle.num_classes, n_test)
    quarter = max(1, math.ceil(cfg.epochs / 4))
    status = "completed"
    lr = peak_lr(cfg)

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        watch.reset()
        seen = 0
        for i, (x, y) in enumerate(train_loader.epoch(epoch)):
            new_lr = peak_lr(cfg) * lr_factor(cfg, step, steps_per_epoch)
            if lr_now is None:
                for g in opt.param_groups:
                    g["lr"] = new_lr
            elif new_lr != lr:  # one fill when the schedule moves, none otherwise
                lr_now.fill_(new_lr)
            lr = new_lr
            if prober is not None:
                prober.start(step, epoch, x, y)
            mark_step(fast)
            detached, hits = step_fn(x, y)
            ctx.average_buffers(model)  # running statistics over all shards (distributed.py)
            watch.update(detached, step)
            loss_sum.add_(detached, alpha=len(y))  # one kernel, summed in float64
            correct += hits
            seen += len(y)
            step += 1
            if ctx.env.enabled:  # every process must stop at the same step
                bad = None
                if (i + 1) % watch.every == 0 or i + 1 == steps_per_epoch:
                    ctx.max_(watch.flag)
                    bad = int(watch.flag) if int(watch.flag) >= 0 else None
            else:
                bad = watch.poll(i, final=i + 1 == steps_per_epoch)
            if bad is not None:
                flags["diverged_step"] = int(bad)
                break
        if "diverged_step" in flags:
            status = "diverged"
            wall += time.perf_counter() - t0
            log(f"{cfg.run_id()}: loss became non-finite at step {flags['diverged_step']}; "
                "stopping (status diverged)")
            break
        train_time = time.perf_counter() - t0
        seen_t = torch.tensor(float(seen), dtype=torch.float64, device=device)
        ctx.sum_(loss_sum, correct, seen_t)  # over the global batch
        seen = int(seen_t)
        ev = evaluate_topk(fast, test_loader, device, cfg.precision, ctx,
                           cfg.eval_batch_size if cfg.compile else None)
        test_loss, test_acc = ev["loss"], ev["acc"]
        epoch_time = time.perf_counter() - t0
        wall += epoch_time
        row = {"epoch": epoch, "step": step, "lr": lr, "train_loss": float(loss_sum) / seen,
               "train_acc": int(correct) / seen, "test_loss": test_loss, "test_acc": test_acc,
               "test_acc5": ev["acc5"], "epoch_time": epoch_time,
               "train_images_per_s": seen / train_time}
        metrics.append(row)
        if epoch == quarter and test_acc <= chance:
            flags["no_learning_at_epoch"] = epoch
        if main:
            run.write_rows("metrics.jsonl", metrics)
            if prober is not None:
                prober.flush()
            run.save_checkpoint(_checkpoint(cfg, model, opt, epoch, step, wall, flags, device))
            if epoch < cfg.epochs:
                run.write_json("summary.json", _summary(cfg, "running", metrics, wall, flags))
                store.record(run)
        log(f"{cfg.run_id()} epoch {epoch}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  test loss {test_loss:.4f} acc {test_acc:.4f}  "
            f"{row['train_images_per_s']:.0f} img/s")

    if prober is not None:
        prober.close()
    if status == "completed" and "no_learning_at_epoch" in flags:
        status = "no_learning"
    summary = _summary(cfg, status, metrics, wall, flags)
    if main:
        run.write_json("summary.json", summary)
        store.record(run)
    ctx.barrier()  # no process leaves before rank 0 has written the result
    return summary


def _checkpoint(cfg, model, opt, epoch, step, wall, flags, device) -> dict:
    optimizer = opt.state_dict()
    for g in optimizer["param_groups"]:  # a graphed step's device-tensor lr is stored as a number
        if isinstance(g["lr"], torch.Tensor):
            g["lr"] = float(g["lr"])
    return {
        "config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer,
        "epoch": epoch, "step": step, "wall_time": wall, "flags": flags,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _summary(cfg: RunConfig, status: str, metrics: list[dict], wall: float, flags: dict) -> dict:
    last = metrics[-1] if metrics else {}
    return {
        "run_id": cfg.run_id(), "status": status, "epochs_done": len(metrics),
        "epochs": cfg.epochs, "test_acc": last.get("test_acc"),
        "test_loss": last.get("test_loss"), "train_acc": last.get("train_acc"),
        "train_loss": last.get("train_loss"), "wall_time": wall, **flags,
    }
