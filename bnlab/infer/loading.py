"""Checkpoints back into models and data: the one place where analysis rebuilds a trained run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bnlab.config import RunConfig, from_json_dict
from bnlab.data import DataBundle, load_data
from bnlab.data.loader import make_loader
from bnlab.errors import UserError
from bnlab.models import build_for
from bnlab.runtime import resolve_device
from bnlab.store import RunDir, load_checkpoint_file


@dataclass
class Loaded:
    path: Path  # the checkpoint file
    cfg: RunConfig
    model: nn.Module  # in eval mode, on `device`
    bundle: DataBundle
    device: torch.device

    @property
    def run_dir(self) -> RunDir | None:
        run = RunDir(self.path.parent)
        return run if run.exists() else None


_BUNDLES: dict[tuple, DataBundle] = {}


def checkpoint_path(path: str | Path) -> Path:
    p = Path(path)
    return p / "checkpoint.pt" if p.is_dir() else p


def config_of(path: Path, state: dict) -> RunConfig:
    try:
        return from_json_dict(dict(state["config"]))
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{str(path)!r} holds a config this version cannot read: {e}") from None


def dataset_name(cfg: RunConfig, data_dir: str | None) -> str:
    """The stored dataset name; for imagefolder:PATH with `data_dir` given, PATH is looked up
    as <data_dir>/<name of PATH>, else taken to be `data_dir` itself (the data moved)."""
    if not data_dir or not cfg.dataset.startswith("imagefolder:"):
        return cfg.dataset
    stored = Path(cfg.dataset.split(":", 1)[1].rstrip("/"))
    moved = Path(data_dir) / stored.name
    return f"imagefolder:{moved if moved.exists() else Path(data_dir)}"


def bundle_for(cfg: RunConfig, data_dir: str | None = None) -> DataBundle:
    """The run's dataset with its fixed subsets; loaded once per process for equal configs."""
    name = dataset_name(cfg, data_dir)
    key = (name, data_dir or cfg.data_dir, cfg.limit_train, cfg.limit_test)
    if key not in _BUNDLES:
        _BUNDLES[key] = load_data(name, data_dir or cfg.data_dir or None, False,
                                  cfg.limit_train, cfg.limit_test, False)
    return _BUNDLES[key]


def load_model(path: str | Path, data_dir: str | None = None, device: str = "cpu",
               bundle: DataBundle | None = None) -> Loaded:
    """Rebuild a run's model from a checkpoint (file or run folder) with weights_only=True.

    A checkpoint whose weights do not fit the architecture its config describes (another
    model, another class count) is a UserError naming the file.
    """
    p = checkpoint_path(path)
    state = load_checkpoint_file(p)
    cfg = config_of(p, state)
    if bundle is None:
        bundle = bundle_for(cfg, data_dir)
    model = build_for(cfg, bundle)
    if not isinstance(state["model"], dict):
        raise UserError(f"{str(p)!r} is not a bnlab checkpoint (model entry is not a state dict)")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:2])[:240]
        raise UserError(f"checkpoint {str(p)!r} does not match model {cfg.model!r} with norm "
                        f"{cfg.norm!r} and {bundle.num_classes} classes: {detail}") from None
    dev = resolve_device(device)
    model = model.to(dev).eval()
    return Loaded(p, cfg, model, bundle, dev)


EVAL_BATCH = 250  # images per inference batch: activations stay small enough for malloc to
# reuse memory (batches of 1000 ResNet-20 activations cost more in page faults than compute)


def test_loader(loaded: Loaded, batch_size: int = EVAL_BATCH):
    return make_loader(loaded.bundle, False, batch_size, loaded.device, False, 0, 0)


def train_loader(loaded: Loaded, batch_size: int | None = None):
    cfg = loaded.cfg
    return make_loader(loaded.bundle, True, batch_size or cfg.batch_size, loaded.device,
                       cfg.augment, cfg.seed, 0)


@torch.no_grad()
def predict(model: nn.Module, loader, transform=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels over a loader, model in its current mode.

    `transform(x)` maps each normalized batch before the forward pass (corruptions).
    """
    outs, ys = [], []
    for x, y in loader.epoch(0):
        if transform is not None:
            x = transform(x)
        outs.append(model(x).float().cpu())
        ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)


def to_unit(x: torch.Tensor, bundle: DataBundle) -> torch.Tensor:
    """Normalized batch -> images in [0, 1]."""
    mean = torch.tensor(bundle.mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return x.float() * std + mean


def from_unit(x: torch.Tensor, bundle: DataBundle, like: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(bundle.mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).to(like.dtype).contiguous(
        memory_format=torch.channels_last if like.is_contiguous(memory_format=torch.channels_last)
        and not like.is_contiguous() else torch.contiguous_format)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that behave like BatchNorm at inference: they keep running statistics.

    Detected by what they hold (running_mean and running_var tensors), not by class, so any
    BN variant of bnlab.norm is found.
    """
    out = []
    for name, m in model.named_modules():
        rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
            out.append((name, m))
    return out
