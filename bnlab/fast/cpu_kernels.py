"""Fused CPU kernels: training-mode BatchNorm + optional residual add + ReLU in one pass.

On the CPU, once the convolutions run on oneDNN's fast kernels, a ResNet step spends a third of
its time in element-wise work around them: BN statistics and normalization, ReLU, the residual
add, and their backward passes, each a separate sweep over the activations (and in bf16 each
converting to float and back). `bn_act(bn, x, residual)` computes relu(bn(x) + residual) as one
reduction sweep and one write sweep forward, and one of each backward (bnlab/fast/csrc/bn_act.cpp,
AVX-512 where the CPU has it): docs/speed.md has the measurements.

The kernels are C++, compiled once per machine, torch version and source on first use
(`prepare()`, a few seconds, through torch.utils.cpp_extension: it needs a C++ compiler and
ninja) into the bnlab cache (`$BNLAB_CACHE/ext`). A model uses them when it is built with them
(`build_model(..., cpu_kernels=True)`, the run option `cpu_kernels`): the builder swaps each
`NormAct` step of its forward (bnlab.models.norm_act) for a `FusedNormAct`, the same call, and
keeps the plain step where the kernels cannot be built or are switched off
(`BNLAB_CPU_KERNELS=0` in the environment for every run of a process). Both give the same result
up to float rounding (tests/test_cpu_kernels.py compares them with a float64 reference).

The builder swaps the steps of a model that holds a norm the kernel computes (`kernel_norm`: a
plain `nn.BatchNorm2d` with affine parameters and running statistics, fixed when the norm is
made). A `FusedNormAct` then takes the kernel only where it is the same computation, which it
checks at each call for what can change after the build: the norm of the call and its training
mode and dtypes, a float32 or bfloat16 CPU tensor in channels_last layout (autocast gives
bfloat16), no forward or backward hook on the norm (`_needs_module_call`: probes add hooks on an
armed step; forward pre-hooks are called, as probes use them), and not while torch.compile or a
tracer is recording the model. Elsewhere it runs torch's ops, exactly the plain step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from bnlab.config import cache_root

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("bn_act.cpp", "augment.cpp")]
# -ffp-contract=off: a * b + c written in scalar code rounds twice, as the torch ops it replaces
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
NAME = "bnlab_cpu_kernels"
_state: dict = {"ops": None, "error": None, "enabled": True, "built": False}


def _cpu_signature() -> str:
    """The CPU features the build targets (-march=native): its flags line, else the platform."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    """Where this machine's build lives: keyed by source, flags, CPU, torch and Python."""
    key = hashlib.sha256("\x00".join([
        *(s.read_text() for s in SOURCES), " ".join(CFLAGS), _cpu_signature(), torch.__version__,
        sys.version, platform.machine()]).encode()).hexdigest()[:16]
    return cache_root() / "ext" / f"cpu_kernels-{key}"


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip package's binary sits in the environment's bin
    folder, which is not on PATH when the environment's python is called without activating
    it."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # optional: a system ninja on PATH does as well

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except (ImportError, AttributeError):
            pass


def prepare(log: Callable[[str], None] | None = None) -> bool:
    """Build (first time on this machine) or load the kernels; True when they are in use.

    Idempotent and process-wide. A failed build is reported once through `log` and leaves the
    torch-op path in place; it is not retried in this process."""
    if _state["ops"] is not None or _state["error"] is not None:
        if log and _state.get("news"):  # built or refused earlier, before a log was given
            log(_state.pop("news"))
        return _state["ops"] is not None
    if os.environ.get("BNLAB_CPU_KERNELS", "1") == "0":
        _state["error"] = "switched off by BNLAB_CPU_KERNELS=0"
        return False
    t0 = time.perf_counter()
    try:
        path = build_dir()
        ready = path / "ready"
        if ready.exists():  # written after a complete build; names the library it made
            torch.ops.load_library(str(path / ready.read_text().strip()))
        else:  # build, or wait for another process's build (cpp_extension locks the folder)
            # torch logs its CUDA-home guess at WARNING on CPU-only machines: not ours to show
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
            # imported only to build: importing it logs that CUDA guess on every CPU machine
            from torch.utils import cpp_extension

            _ninja_on_path()
            if not cpp_extension.is_ninja_available():
                raise RuntimeError("ninja is not installed")
            path.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES],
                               extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(path), is_python_module=False,
                               verbose=False)
            # torch names a rebuild in the same folder NAME_v1.so, ...: record the newest
            built = max(path.glob(f"{NAME}*.so"), key=lambda p: p.stat().st_mtime)
            tmp = path / f"ready.{os.getpid()}.tmp"  # processes that built together each write
            tmp.write_text(built.name)
            tmp.replace(ready)
            _state["built"] = True
        _state["ops"] = torch.ops.bnlab_cpu
    except Exception as e:  # a compiler, ninja or header problem: fall back, say why once
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _state["error"] = f"{type(e).__name__}: {first}"[:300]
        _say(f"fused CPU kernels unavailable ({_state['error']}); using torch's ops", log)
        return False
    if _state["built"]:
        _say(f"fused CPU kernels built in {time.perf_counter() - t0:.1f} s ({path})", log)
    return True


def _say(message: str, log: Callable[[str], None] | None) -> None:
    """Log now, or keep it for the first `prepare` call that has a log (a run's)."""
    if log:
        log(message)
    else:
        _state["news"] = message


def use_cpu_kernels(on: bool, log: Callable[[str], None] | None = None) -> str:
    """What a run calls first: switch the kernels on (building them if needed) or off for what is
    not part of its model (the loader's batch making, `bn_act`); the model's own norm steps were
    chosen when it was built (bnlab.models.norm_act). Returns `describe()` for the record."""
    set_enabled(on)
    if on:
        prepare(log)
    return describe()


def set_enabled(flag: bool) -> None:
    """Switch the loader's fused batch making and `bn_act` on or off for this process (the run
    option `cpu_kernels`); a model built with FusedNormAct steps keeps them."""
    _state["enabled"] = bool(flag)


def active() -> bool:
    """True when the loader and `bn_act` take the fused path (built, loaded and switched on)."""
    return _state["enabled"] and _state["ops"] is not None


def describe() -> str:
    """One word for run records and bench rows: fused | off | unavailable (reason)."""
    if not _state["enabled"]:
        return "off"
    if _state["ops"] is not None:
        return "fused"
    return f"unavailable ({_state['error']})" if _state["error"] else "not loaded"


class BnActFunction(torch.autograd.Function):
    """relu?(batch_norm(x) [+ residual]) with batch statistics; updates the running ones."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, momentum, eps, relu):
        y, mask, mean, invstd = _state["ops"].bn_act_forward(
            x, weight, bias, residual, running_mean, running_var, momentum, eps, relu)
        ctx.save_for_backward(x, mask, mean, invstd, weight)
        ctx.residual = residual is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, mask, mean, invstd, weight = ctx.saved_tensors
        gy = gy.contiguous(memory_format=torch.channels_last)
        gx, gw, gb, gr = _state["ops"].bn_act_backward(gy, mask, x, mean, invstd, weight,
                                                       ctx.residual)
        return gx, gw, gb, (gr if ctx.residual else None), None, None, None, None, None


def kernel_norm(bn: nn.Module) -> bool:
    """Whether `bn` is a norm the kernel computes: a plain nn.BatchNorm2d with affine parameters
    and running statistics. What it tests is fixed when the module is made, so the model
    builder asks it once (bnlab.models.norm_act.use_fused_norm_act) and a model without such a
    norm keeps torch's step."""
    return type(bn) is nn.BatchNorm2d and bn.affine and bn.track_running_stats


def _needs_module_call(bn: nn.Module) -> bool:
    """Whether a hook other than a plain forward pre-hook is registered on `bn` or on every
    module: such a hook needs the norm's own call. Asked at each call, not at build, because
    hooks come and go after the model is built (probes add them on an armed step and remove
    them after it). The dictionaries are torch's own, the ones nn.Module.__call__ reads: no
    public call says whether a module has hooks."""
    return bool(bn._forward_hooks or bn._forward_pre_hooks_with_kwargs
                or bn._backward_hooks or bn._backward_pre_hooks
                or _module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _recording() -> bool:
    """Whether torch.compile or a tracer is recording the model (it records torch's ops)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch.jit.is_scripting())


def _fusable(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether relu(bn(x) + residual) is the kernel's computation for this call: the norm, its
    mode and dtypes (a model may be switched to eval or cast after it is built), the tensors
    of this call, no hook that needs the norm's own call, nothing recording the model."""
    return (kernel_norm(bn) and bn.training and x.device.type == "cpu" and x.dim() == 4
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.is_contiguous(memory_format=torch.channels_last)
            and x.numel() > x.shape[1]  # torch refuses one value per channel: keep its error
            and bn.weight.dtype == torch.float32 and bn.running_mean.dtype == torch.float32
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                      and residual.device == x.device))
            and not _needs_module_call(bn) and not _recording())


class FusedNormAct(nn.Module):
    """relu(norm(x) + residual) (residual optional) as one kernel where `_fusable` holds, else
    torch's ops: the call of bnlab.models.norm_act.NormAct, which the model builder swaps for
    this one when the kernels are in use. It holds no parameters: the norm stays the model's
    own module (its name, state and hooks unchanged)."""

    def forward(self, norm: nn.Module, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        return _fused_or_torch(norm, x, residual, True)


def bn_act(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
           relu: bool = True) -> torch.Tensor:
    """relu(bn(x) + residual) (residual and relu optional) as a function: fused where the
    kernels are `active()` and the call applies, else exactly `bn(x)`, `+ residual`, `F.relu`
    with torch's ops."""
    if not active():
        return _torch_ops(bn, x, residual, relu)
    return _fused_or_torch(bn, x, residual, relu)


def _fused_or_torch(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
                    relu: bool) -> torch.Tensor:
    if isinstance(x, torch.fx.Proxy) or not _fusable(bn, x, residual):  # FX traces torch's ops
        return _torch_ops(bn, x, residual, relu)
    # plain forward pre-hooks (the probes' input rows) are run here, as nn.Module.__call__ would
    for hook in bn._forward_pre_hooks.values():
        result = hook(bn, (x,))
        if result is not None:
            x = result[0] if isinstance(result, tuple) else result
            if not _fusable(bn, x, residual):
                return _torch_ops(bn.forward, x, residual, relu)  # hooks have run
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum
    if momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
        momentum = 1.0 / float(bn.num_batches_tracked)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    return BnActFunction.apply(x, bn.weight, bn.bias, residual, bn.running_mean, bn.running_var,
                               float(momentum), float(bn.eps), relu)


def _torch_ops(norm, x, residual, relu):
    y = norm(x)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def crop_flip_normalize(src: torch.Tensor, idx: torch.Tensor, offsets: torch.Tensor | None,
                        flips: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
                        pad: int) -> torch.Tensor:
    """src[idx] (uint8 N, C, H, W) zero-padded by `pad`, cropped at `offsets` (n, 2), flipped
    where `flips`, then `* scale + shift` per channel: float32, channels_last. The same values
    as bnlab.data.loader's crop_flip and Normalizer; needs `active()`."""
    return _state["ops"].crop_flip_normalize(
        src, idx.contiguous(), None if offsets is None else offsets.contiguous(),
        None if flips is None else flips.contiguous(), scale.reshape(-1).contiguous(),
        shift.reshape(-1).contiguous(), pad)
