"""Where and how code runs: the device a name stands for, bf16 autocast, and the record of the
software and hardware a result came from."""

from __future__ import annotations

import contextlib
import platform
import subprocess
from pathlib import Path

import torch

import bnlab
from bnlab.errors import UserError
from bnlab.fast.cpu_kernels import describe as cpu_kernels_state


def resolve_device(name: str) -> torch.device:
    """'auto' (a CUDA GPU when there is one, else the CPU), 'cpu' or 'cuda'."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but no CUDA GPU is available; accepted here: "
                        "auto, cpu")
    return torch.device(name)


def on_cpu(name: str) -> bool:
    """Whether a run of device `name` trains on the CPU ('cpu', or 'auto' without a GPU),
    without resolve_device's refusal of 'cuda' on a machine without one."""
    return name == "cpu" or name == "auto" and not torch.cuda.is_available()


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast (or nothing for fp32); cache=False inside a CUDA graph capture, whose
    weights' bf16 copies must be made by the graph itself every step."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def environment(device: torch.device) -> dict:
    """Versions (bnlab, torch, CUDA, Python), platform, threads, device name, the state of the
    fused CPU kernels and the git commit of the bnlab source (None outside a checkout)."""
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
