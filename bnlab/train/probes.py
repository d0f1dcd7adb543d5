"""Probes during training: what happens inside the network, sampled every N optimizer steps.

Enabled by RunConfig.probe_every (0 = off: no prober exists, no hook is registered); refused
under data-parallel training with more than one process (bnlab.train.loop). At a probe step t
(t % probe_every == 0, t counting optimizer steps from 0) with batch (x, y), parameters W_t
before and W_{t+1} after the update, and L the training criterion on that batch (data loss
only: weight decay is applied inside the optimizer and not part of L), the prober records rows
of probes.jsonl:

    {"step", "epoch", "layer", "metric", "value"}            one value
    {"step", "epoch", "layer", "metric", "value", "unit"}    one value of one unit (metric unit_*)

activations, at the input of every norm position (a norm layer, or the nn.Identity that stands
where a norm would be in a no-norm model) and at every block output; for mlp3x100 at the input
of each sigmoid (the norm's output, Ioffe & Szegedy 2015 Fig. 1, layer "hidden.<i>.sigmoid"),
measured on the fixed probe batch (bnlab.train.probe_batch: RunConfig.probe_images held-out
images, one extra forward pass at W_t in training mode, before the step's own forward; with
probe_images 0, on the step's own training batch during its forward):
    act_mean, act_std   mean and population std over all elements of that forward pass
    act_p15/p50/p85     15th/50th/85th percentiles pooled over all elements: exact up to 2^16
                        elements, else on 2^16 positions drawn uniformly at random
                        (bnlab.train.probe_stats, which states the sampling error)
    unit_p15/p50/p85    the same percentiles of each of UNITS_PER_LAYER units (row key "unit":
                        the feature index of an (N, C) activation, the channel of an
                        (N, C, H, W) one, all N*H*W values of it), chosen once from the layer
                        name alone, so every seed and arm of a study follows the same unit
                        indices; Ioffe & Szegedy's Fig. 1(b, c) follows one unit
per conv/linear layer (named by module): grad_norm = ||dL/dW||_2 (W = its weight),
    weight_norm = ||W||_2; layer "" gives both over all parameters. Gradients are read right
    after the backward pass, before gradient clipping; with grad_clip > 0, grad_norm_clipped on
    layer "" is the norm of the gradient the update used (clipping scales every layer alike)
per norm layer: norm_weight_mean, norm_bias_mean (mean of gamma, beta), running_mean_mean,
    running_var_mean (mean over channels of the running statistics, after this step's forward)
Santurkar et al. 2018 (all on the same batch, the network in training mode):
    ics_l2, ics_cos (per weight layer i, up to ICS_LAYERS of them): G = dL/dW_i at W_t (before
        clipping); G' = dL/dW_i at (W_{t+1} for the parameters used before W_i in the forward
        pass, W_t for W_i and the rest); ics_l2 = ||G - G'||_2, ics_cos = <G, G'>/(|G| |G'|).
        "Used before" is the order in which a forward pass first uses each parameter, read once
        from the autograd graph (forward_rank): in Fixup and SkipInit blocks the scalar biases
        and multipliers are registered apart from the convs they surround, so registration order
        is not forward order.
    on layer "", with g = dL/dW at W_t (all parameters) and step sizes eta_k > 0 (eta_0 = 0):
    loss_variation_*      max_k L(W_t - eta_k g) - min_k L(W_t - eta_k g)
    grad_predictiveness_* max_k ||g - grad L(W_t - eta_k g)||_2
    beta_smoothness_*     max_k ||g - grad L(W_t - eta_k g)||_2 / ||eta_k g||_2
    with suffix _abs for the absolute step sizes of RunConfig.probe_step_sizes (the same for
    every arm of a study: the values to compare arms on) and _lr for eta_k = lr_t *
    STEP_MULTIPLES (relative to each run's own learning rate). A non-finite loss or gradient
    at any eta_k makes the value inf.
The extra passes (1 + len(STEP_MULTIPLES) + len(step sizes) + ICS layers forward/backward
passes per probe step, and one forward pass at the first probe step for the forward order) run
with the RNG state of the training forward (same dropout masks) inside torch's fork_rng,
restore every buffer (BN running statistics) and W_{t+1} bit for bit, and use
torch.autograd.grad (no .grad is touched), so a probed run follows the same trajectory as an
unprobed one.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from bnlab.config import PROBE_STEP_SIZES, step_sizes
from bnlab.models import build_model
from bnlab.models.cifar_resnet import BasicBlock
from bnlab.models.mlp import Hidden
from bnlab.models.names import torchvision_blocks
from bnlab.norm import is_norm_layer
from bnlab.train.board import event_dir, summary_writer
from bnlab.train.probe_batch import ProbeBatch, measure_on
from bnlab.train.probe_stats import (
    MAX_QUANTILE_ELEMENTS,
    UNITS_PER_LAYER,
    activation_stats,
    choose_units,
    generator,
    stable_seed,
    unit_stats,
)

ICS_LAYERS = 8  # weight layers with an ICS measurement, evenly spread over depth
STEP_MULTIPLES = (0.5, 1.0, 2.0, 4.0)  # step sizes along -g, in units of the current lr
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

__all__ = ["ICS_LAYERS", "STEP_MULTIPLES", "UNITS_PER_LAYER", "Prober", "activation_stats",
           "default_layers", "forward_rank", "make_prober"]


def _norm_positions(cfg) -> set[str]:
    """Module names where the BN variant of cfg's model has a norm layer (built on 'meta')."""
    placement = "post_conv" if cfg.placement == "first_k" else cfg.placement
    try:
        with torch.device("meta"):
            ref = build_model(cfg.model, 10, norm="bn", placement=placement)
    except Exception:  # noqa: BLE001 - an architecture without a BN variant: no positions
        return set()
    return {n for n, m in ref.named_modules() if is_norm_layer(m)}


def _is_block(m: nn.Module) -> bool:
    return isinstance(m, (BasicBlock, Hidden, *torchvision_blocks()))


def default_layers(cfg, model: nn.Module) -> list[tuple[str, str, str]]:
    """(row layer name, module name, "input" | "output") of the activations to record."""
    positions = _norm_positions(cfg)
    blocks = set(model.block_names()) if hasattr(model, "block_names") else set()
    out = []
    for name, m in model.named_modules():
        if name in positions or is_norm_layer(m):
            if cfg.model == "mlp3x100":
                out.append((name.rsplit(".", 1)[0] + ".sigmoid", name, "output"))
            else:
                out.append((name, name, "input"))
        elif _is_block(m) or name in blocks:
            out.append((name, name, "output"))
    return out


def forward_rank(model: nn.Module, x: torch.Tensor, params: list[nn.Parameter]) -> list[float]:
    """Per parameter, the autograd sequence number of the first operation of a forward pass of
    `model` on x that used it (inf: unused). Autograd numbers operations in the order they
    run, so sorting by rank gives the forward order, whatever order the module registered its
    parameters in; parameters of one operation (a conv's weight and bias) tie."""
    with torch.enable_grad():
        out = model(x)
    first: dict[int, int] = {}
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            var = getattr(nxt, "variable", None)  # AccumulateGrad: the leaf it feeds
            if var is not None:
                first[id(var)] = min(first.get(id(var), math.inf), node._sequence_nr())
            elif nxt is not None:
                stack.append(nxt)
    return [first.get(id(p), math.inf) for p in params]


class Prober:
    """Records probes of one run; see the module docstring for every definition."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, criterion, every: int,
                 layers: list[tuple[str, str, str]], precision: str = "fp32", run=None,
                 rows: list[dict] | None = None, tensorboard_dir=None, seed: int = 0,
                 grad_clip: float = 0.0,
                 steps: tuple[float, ...] = step_sizes(PROBE_STEP_SIZES),
                 purge_step: int | None = None, probe_batch: ProbeBatch | None = None):
        self.probe_batch = probe_batch  # None: activations of the training batch
        self.model, self.opt, self.criterion, self.every = model, opt, criterion, every
        self.layers, self.precision, self.run = layers, precision, run
        self.seed, self.grad_clip, self.steps = seed, grad_clip, tuple(steps)
        self.rows: list[dict] = list(rows or [])
        self.armed = False
        self.g: list[torch.Tensor] | None = None
        self._handles: list = []
        self._units: dict[str, list[int]] = {}
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        index = {id(p): i for i, (_, p) in enumerate(self.params)}
        self.weight_layers = [(n, m, index[id(m.weight)]) for n, m in model.named_modules()
                              if isinstance(m, WEIGHT_LAYERS) and id(m.weight) in index]
        self.norm_layers = [(n, m) for n, m in model.named_modules()
                            if is_norm_layer(m)
                            or isinstance(getattr(m, "running_mean", None), torch.Tensor)]
        self.rank: list[float] | None = None  # forward order, read at the first probe step
        self.ics_layers: list[tuple[str, int]] = []
        self._opt_handles = [opt.register_step_pre_hook(self._before_update),
                             opt.register_step_post_hook(self._after_update)]
        self.writer = (summary_writer(tensorboard_dir, purge_step)
                       if tensorboard_dir is not None else None)

    def _pick_ics(self) -> list[tuple[str, int]]:
        ordered = sorted(self.weight_layers, key=lambda w: self.rank[w[2]])
        cands = ordered[1:]  # the first layer has no earlier layers: ICS = 0
        if len(cands) <= ICS_LAYERS:
            return [(n, i) for n, _, i in cands]
        picks = torch.linspace(0, len(cands) - 1, ICS_LAYERS).round().long().unique().tolist()
        return [(cands[k][0], cands[k][2]) for k in picks]

    # -- called from the training loop -------------------------------------------------------
    def start(self, step: int, epoch: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Call before the forward pass of every step; arms the probes at probe steps."""
        if step % self.every:
            return
        self.armed, self.step, self.epoch, self.x, self.y = True, step, epoch, x, y
        self.g = None
        self.rng = torch.get_rng_state()
        self.rng_cuda = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        modules = dict(self.model.named_modules())
        for row_name, mod_name, where in self.layers:
            m = modules[mod_name]
            if where == "input":
                h = m.register_forward_pre_hook(
                    lambda _m, args, row_name=row_name: self._record_act(row_name, args[0]))
            else:
                h = m.register_forward_hook(
                    lambda _m, _a, out, row_name=row_name: self._record_act(row_name, out))
            self._handles.append(h)
        if self.probe_batch is not None:  # measured now, on the fixed batch, at W_t
            measure_on(self.model, self.probe_batch, self.precision)
            self._remove_act_hooks()

    def _remove_act_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def gradients_ready(self) -> None:
        """Call after the backward pass, before anything changes the gradients (clipping): the
        probes read the raw gradient here (without this call, just before the update)."""
        if self.armed:
            self.g = self._grads()

    def flush(self) -> None:
        """Write probes.jsonl (all rows so far) through the store."""
        if self.run is not None:
            self.run.write_rows("probes.jsonl", self.rows)
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.flush()
        for h in self._handles + self._opt_handles:
            h.remove()
        self._handles, self._opt_handles = [], []
        if self.writer is not None:
            self.writer.close()

    # -- recording ---------------------------------------------------------------------------
    def _add(self, layer: str, metric: str, value: float, unit: int | None = None) -> None:
        row = {"step": self.step, "epoch": self.epoch, "layer": layer, "metric": metric,
               "value": float(value)}
        if unit is not None:
            row["unit"] = unit
        self.rows.append(row)
        if self.writer is not None:
            tag = f"{metric}/{layer or 'model'}" + ("" if unit is None else f"[{unit}]")
            self.writer.add_scalar(tag, float(value), self.step)

    def _record_act(self, layer: str, t: torch.Tensor) -> None:
        if not torch.is_tensor(t):
            return
        gen = generator(stable_seed("act", self.seed, self.step, layer), t.device)
        for k, v in activation_stats(t, gen).items():
            self._add(layer, k, v)
        if t.dim() >= 2 and t.shape[1] > 0:
            if layer not in self._units:
                self._units[layer] = choose_units(layer, t.shape[1])
            for u, stats in unit_stats(t, self._units[layer], gen).items():
                for k, v in stats.items():
                    self._add(layer, k, v, unit=u)
        if self.writer is not None:
            flat = t.detach().float().flatten()
            if flat.numel() > MAX_QUANTILE_ELEMENTS:
                flat = flat[torch.randint(flat.numel(), (MAX_QUANTILE_ELEMENTS,),
                                          generator=gen, device=flat.device)]
            self.writer.add_histogram(f"act/{layer}", flat.cpu(), self.step)

    @torch.no_grad()
    def _grads(self) -> list[torch.Tensor]:
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for _, p in self.params]

    @torch.no_grad()
    def _before_update(self, opt, args, kwargs) -> None:
        if not self.armed:
            return
        self._remove_act_hooks()  # the extra passes must not record activations
        self.lr = float(opt.param_groups[0]["lr"])
        if self.g is None:  # nothing ran between the backward pass and the update
            self.g = self._grads()
        self.w_t = [p.detach().clone() for _, p in self.params]
        for name, _m, i in self.weight_layers:
            self._add(name, "grad_norm", self.g[i].norm())
            self._add(name, "weight_norm", self.w_t[i].norm())
        self._add("", "grad_norm", _norm(self.g))
        if self.grad_clip > 0:
            self._add("", "grad_norm_clipped", _norm(self._grads()))
        self._add("", "weight_norm", _norm(self.w_t))
        for name, m in self.norm_layers:
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(w, torch.Tensor):
                self._add(name, "norm_weight_mean", w.mean())
            if isinstance(b, torch.Tensor):
                self._add(name, "norm_bias_mean", b.mean())
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                self._add(name, "running_mean_mean", rm.float().mean())
                self._add(name, "running_var_mean", rv.float().mean())

    def _after_update(self, opt, args, kwargs) -> None:
        if not self.armed:
            return
        self.armed = False
        params = [p for _, p in self.params]
        with torch.no_grad():
            w_next = [p.detach().clone() for p in params]
            buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        devices = [self.x.device] if self.x.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                if self.rank is None:
                    self._set_rng()
                    self.rank = forward_rank(self.model, self.x, params)
                    self.ics_layers = self._pick_ics()
                for name, i in self.ics_layers:
                    self._set(params, [w_next[k] if self.rank[k] < self.rank[i]
                                       else self.w_t[k] for k in range(len(params))])
                    g2 = self._grad([params[i]])[1][0]
                    g1 = self.g[i]
                    self._add(name, "ics_l2", (g1 - g2).norm())
                    cos = (g1 * g2).sum() / (g1.norm() * g2.norm()).clamp(min=1e-30)
                    self._add(name, "ics_cos", cos)
                self._landscape(params)
        finally:
            self._set(params, w_next)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            self.x = self.y = self.g = self.w_t = None

    def _landscape(self, params: list[nn.Parameter]) -> None:
        self._set(params, self.w_t)
        loss0, g0 = self._grad(params)
        for suffix, etas in (("lr", [self.lr * m for m in STEP_MULTIPLES]), ("abs", self.steps)):
            spread, diff, beta = self._along(params, loss0, g0, etas)
            self._add("", f"loss_variation_{suffix}", spread)
            self._add("", f"grad_predictiveness_{suffix}", diff)
            self._add("", f"beta_smoothness_{suffix}", beta)

    def _along(self, params, loss0: float, g0: list[torch.Tensor],
               etas) -> tuple[float, float, float]:
        """(loss variation, gradient predictiveness, beta smoothness) over W_t - eta g0."""
        losses, diffs, betas = [loss0], [], []
        g_norm = _norm(g0)
        for eta in etas:
            self._set(params, [w - eta * g for w, g in zip(self.w_t, g0)])
            loss, g = self._grad(params)
            d = _norm([a - b for a, b in zip(g0, g)])
            losses.append(loss)
            diffs.append(d)
            betas.append(d / max(eta * g_norm, 1e-30))
        if not all(math.isfinite(v) for v in losses + diffs + betas):
            return math.inf, math.inf, math.inf
        return max(losses) - min(losses), max(diffs), max(betas)

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    @torch.no_grad()
    def _set(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
        for p, v in zip(params, values):
            p.copy_(v)

    def _set_rng(self) -> None:
        torch.set_rng_state(self.rng)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state(self.rng_cuda, self.x.device)

    def _grad(self, wrt: list[nn.Parameter]) -> tuple[float, list[torch.Tensor]]:
        """L and dL/d(wrt) on the probe batch, with the training forward's RNG state."""
        self._set_rng()
        ctx = (torch.autocast(self.x.device.type, dtype=torch.bfloat16)
               if self.precision == "bf16" else contextlib.nullcontext())
        with torch.enable_grad():
            with ctx:
                loss = self.criterion(self.model(self.x).float(), self.y)
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(wrt, grads)]
        return float(loss.detach()), grads


def _norm(ts: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in ts)))


def make_prober(cfg, model: nn.Module, opt: torch.optim.Optimizer, criterion, run=None,
                start_epoch: int = 0, start_step: int = 0,
                probe_batch: ProbeBatch | None = None) -> Prober:
    """The prober of a run: default layers, earlier rows kept on resume (epochs <= start_epoch),
    TensorBoard scalars and histograms when cfg.tensorboard (in the run's event folder under
    OUT/tensorboard, board.py, subfolder probes; a run starting at `start_step`, 0 included,
    purges the steps from there that a killed attempt wrote)."""
    rows = []
    if run is not None and start_epoch > 0:
        rows = [r for r in run.read_rows("probes.jsonl") if r["epoch"] <= start_epoch]
    tb = None
    if getattr(cfg, "tensorboard", False) and run is not None:
        tb = event_dir(run.path.parent, cfg) / "probes"
    return Prober(model, opt, criterion, cfg.probe_every, default_layers(cfg, model),
                  cfg.precision, run, rows, tb, seed=cfg.seed, grad_clip=cfg.grad_clip,
                  steps=step_sizes(cfg.probe_step_sizes),
                  purge_step=start_step, probe_batch=probe_batch)
