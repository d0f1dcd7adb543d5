"""Folding BatchNorm into the convolution or linear layer before it, for inference.

In eval mode a BN layer is a fixed affine map per channel c:

    y_c = (x_c - mu_c) / sqrt(var_c + eps) * gamma_c + beta_c = s_c * x_c + (beta_c - s_c mu_c),
    s_c = gamma_c / sqrt(var_c + eps)

so after a conv/linear layer x_c = <W_c, u> + b_c the pair equals one layer with

    W'_c = s_c * W_c,    b'_c = s_c * (b_c - mu_c) + beta_c      (b_c = 0 without a bias).

`fold_params` is that formula (computed in float64, returned in the weight's dtype);
`fold_model` does the module surgery: it traces the model with torch.fx to find each BN-like
layer whose only input is the output of a Conv1d/2d/3d or Linear used nowhere else, folds the
pair, and replaces the BN by nn.Identity. Layers are recognised by behaviour, not class: a
module holding running_mean, running_var, eps (and optional weight/bias) whose eval-mode output
on a random probe input equals the affine map above. A norm after an activation (placement
post_act) or without running statistics is left in place and reported.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time

import torch
import torch.fx
from torch import nn

from bnlab.errors import UserError
from bnlab.infer.loading import norm_layers

FOLDABLE_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_params(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
                var: torch.Tensor, eps: float, gamma: torch.Tensor | None,
                beta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of a conv/linear layer followed by an eval-mode BN (formula in the module doc).

    `weight` has the output channels in dimension 0 (Conv*d and Linear); gamma/beta None mean
    1/0 (BN without affine parameters).
    """
    w64 = weight.detach().double()
    c = w64.shape[0]
    g = gamma.detach().double() if gamma is not None else torch.ones(c, dtype=torch.float64,
                                                                      device=weight.device)
    bt = beta.detach().double() if beta is not None else torch.zeros_like(g)
    b = bias.detach().double() if bias is not None else torch.zeros_like(g)
    s = g / torch.sqrt(var.detach().double() + eps)
    w_new = w64 * s.view(-1, *([1] * (w64.ndim - 1)))
    b_new = s * (b - mean.detach().double()) + bt
    dtype = weight.dtype
    return w_new.to(dtype), b_new.to(dtype)


def behaves_like_bn(m: nn.Module, num_features: int) -> bool:
    """True when m's eval-mode output is the per-channel affine map of its running statistics.

    Checked on a random (2, C, 3, 3) probe input (and (2, C) for 1-d norms) against a float64
    reference, so a norm that ignores its running statistics at inference (or uses them in
    another way) is never folded.
    """
    needed = ("running_mean", "running_var", "eps")
    if not all(isinstance(getattr(m, a, None), torch.Tensor | float | int) for a in needed):
        return False
    if getattr(m, "running_mean", None) is None or m.training:
        return False
    p = next(iter(m.buffers()), None)
    dev = p.device if p is not None else torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    shapes = [(2, num_features), (2, num_features, 3, 3)]
    gamma, beta = getattr(m, "weight", None), getattr(m, "bias", None)
    for shape in shapes:
        x = torch.randn(shape, generator=g).to(dev)
        try:
            with torch.no_grad():
                y = m(x.to(m.running_mean.dtype))
        except (RuntimeError, ValueError):
            continue
        view = (1, -1) + (1,) * (len(shape) - 2)
        s = torch.ones(num_features, dtype=torch.float64, device=dev) if gamma is None \
            else gamma.detach().double()
        b = torch.zeros_like(s) if beta is None else beta.detach().double()
        s = s / torch.sqrt(m.running_var.detach().double() + float(m.eps))
        ref = (x.double() - m.running_mean.detach().double().view(view)) * s.view(view) \
            + b.view(view)
        scale = ref.abs().max().clamp(min=1.0)
        return bool(((y.double() - ref).abs().max() / scale) < 1e-4)
    return False


def _require_eval(model: nn.Module) -> None:
    training = [n or "<model>" for n, m in model.named_modules() if m.training]
    if training:
        raise UserError(f"BN folding needs a model in eval mode, but {training[0]!r} is in "
                        "training mode (batch statistics cannot be folded); call model.eval()")


def find_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(foldable (layer, norm) name pairs, [(norm, reason it is left)]) from an fx trace."""
    candidates = dict(norm_layers(model))
    class Tracer(torch.fx.Tracer):  # norm layers stay single calls even when custom classes
        def is_leaf_module(self, m, qualname):
            return qualname in candidates or super().is_leaf_module(m, qualname)

    try:
        gm = torch.fx.GraphModule(model, Tracer().trace(model))
    except Exception as e:  # noqa: BLE001 - any python the tracer cannot follow
        raise UserError(f"cannot trace {type(model).__name__} to find conv->BN pairs: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs, left = [], []
    seen = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in candidates:
            continue
        name = node.target
        seen.add(name)
        bn = candidates[name]
        prev = node.args[0] if node.args else None
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module"
                and isinstance(modules.get(prev.target), FOLDABLE_INTO)):
            what = "no layer"
            if isinstance(prev, torch.fx.Node):
                what = getattr(prev.target, "__name__", str(prev.target))
            left.append((name, f"follows {what}, not a conv/linear layer"))
            continue
        layer = modules[prev.target]
        if len(prev.users) != 1 or calls[prev.target] != 1 or calls[name] != 1:
            left.append((name, f"{prev.target} output is used elsewhere or a module is shared"))
            continue
        if not behaves_like_bn(bn, layer.weight.shape[0]):
            left.append((name, "eval-mode output is not the affine map of its running "
                               "statistics"))
            continue
        pairs.append((prev.target, name))
    for name in candidates:
        if name not in seen:
            left.append((name, "not called in the traced forward pass"))
    return pairs, left


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def fold_model(model: nn.Module, inplace: bool = False) -> tuple[nn.Module, dict]:
    """A copy of an eval-mode `model` with every conv/linear -> BN pair folded.

    Returns (folded model, {"folded": [[layer, norm], ...], "left": [[norm, reason], ...]}).
    Refuses (UserError) a model in training mode.
    """
    _require_eval(model)
    if not inplace:
        model = copy.deepcopy(model)
    pairs, left = find_pairs(model)
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        bn = model.get_submodule(bn_name)
        w, b = fold_params(layer.weight, layer.bias, bn.running_mean, bn.running_var,
                           float(bn.eps), getattr(bn, "weight", None), getattr(bn, "bias", None))
        with torch.no_grad():
            layer.weight.copy_(w)
            if layer.bias is None:
                layer.bias = nn.Parameter(b)
            else:
                layer.bias.copy_(b)
        _set_module(model, bn_name, nn.Identity())
    return model.eval(), {"folded": [list(p) for p in pairs], "left": [list(x) for x in left]}


PARITY_LIMIT = 1e-5  # max |logit difference| / max |logit| accepted in float32


@contextlib.contextmanager
def full_fp32():
    """TF32 off for CUDA convolutions and matmuls: the parity check is about float32."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def parity(model: nn.Module, folded: nn.Module, loader) -> dict:
    """Max |logit difference| of the folded vs unfolded model over a loader, and that maximum
    divided by the largest |logit| of the unfolded model (float32; TF32 off on CUDA)."""
    max_abs, max_logit, n = 0.0, 0.0, 0
    with full_fp32():
        for x, _ in loader.epoch(0):
            a, b = model(x).float(), folded(x).float()
            max_abs = max(max_abs, float((a - b).abs().max()))
            max_logit = max(max_logit, float(a.abs().max()))
            n += len(x)
    rel = max_abs / max_logit if max_logit > 0 else 0.0
    return {"max_abs_diff": max_abs, "max_abs_logit": max_logit, "rel_diff": rel,
            "n_images": n, "limit": PARITY_LIMIT, "ok": rel <= PARITY_LIMIT}


@torch.no_grad()
def time_pair(a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int = 20,
              warmup: int = 3) -> tuple[dict, dict]:
    """Wall time of a(x) and b(x): calls alternate a, b, a, b, ... after `warmup` of each, so
    that load from other processes on a shared machine hits both alike. Median, quartiles."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        a(x)
        b(x)
    sync()
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for model, t in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            model(x)
            sync()
            t.append(time.perf_counter() - t0)
    out = []
    for t in times:
        med = statistics.median(t)
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [med, med, med]
        out.append({"batch": len(x), "median_s": med, "q25_s": q[0], "q75_s": q[2],
                    "repeats": repeats, "images_per_s": len(x) / med})
    return out[0], out[1]


def speed(model: nn.Module, folded: nn.Module, example: torch.Tensor,
          batches=(1, 256), repeats: int = 20) -> list[dict]:
    """Latency (batch 1) and throughput (batch 256) of both models on example's device."""
    rows = []
    for b in batches:
        reps = max(1, -(-b // len(example)))
        x = example.repeat(reps, *([1] * (example.ndim - 1)))[:b].contiguous()
        t_u, t_f = time_pair(model, folded, x, repeats)
        rows.append({"device": str(x.device), "batch": b, "unfolded": t_u, "folded": t_f,
                     "speedup": t_u["median_s"] / t_f["median_s"]})
    return rows
