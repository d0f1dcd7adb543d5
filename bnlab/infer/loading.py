"""Checkpoints back into models and data: the one place where analysis rebuilds a trained run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bnlab.config import PRECISIONS, RunConfig, from_json_dict
from bnlab.data import DataBundle, Split, load_data
from bnlab.data.loader import make_loader
from bnlab.errors import UserError
from bnlab.fast.accel import memory_format_for
from bnlab.models import build_for
from bnlab.runtime import autocast, resolve_device
from bnlab.store import RunDir, load_checkpoint_file

USER_BATCH = 128  # images per training batch of PreciseBN for a user's own model, by default


@dataclass
class Loaded:
    """A model ready for analysis: a bnlab run (`cfg` set) or a user's own model (`entry` set,
    `cfg` None), with the dataset it is analysed on."""

    path: Path  # the checkpoint file, or the user's state_dict file
    cfg: RunConfig | None
    model: nn.Module  # in eval mode, on `device`
    bundle: DataBundle
    device: torch.device
    entry: str | None = None  # package.module:function of a user's model
    user_batch_size: int = USER_BATCH
    user_workers: int = 4  # DataLoader workers for a user's streamed data (0: images in memory)

    @property
    def run_dir(self) -> RunDir | None:
        if self.cfg is None:
            return None
        run = RunDir(self.path.parent)
        return run if run.exists() else None

    @property
    def model_name(self) -> str:
        return self.cfg.model if self.cfg is not None else str(self.entry)

    @property
    def norm_name(self) -> str:
        return self.cfg.norm if self.cfg is not None else "as defined by the model"

    @property
    def precision(self) -> str:
        """The precision the run trained and evaluated in (fp32 for a user's model): the one
        its predictions are made in, so that they give the test accuracy the run recorded."""
        p = self.cfg.precision if self.cfg is not None else "fp32"
        return p if p in PRECISIONS else "fp32"

    @property
    def batch_size(self) -> int:
        """The training batch size (the run's; for a user's model --batch-size)."""
        return self.cfg.batch_size if self.cfg is not None else self.user_batch_size

    @property
    def workers(self) -> int:
        return self.cfg.workers if self.cfg is not None else self.user_workers


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
    # the layout the run trained in: oneDNN's convolutions are faster on it (1.3x on a CPU)
    model = model.to(dev, memory_format=memory_format_for(dev, cfg.model)).eval()
    return Loaded(p, cfg, model, bundle, dev)


EVAL_BATCH = 250  # images per inference batch: activations stay small enough for malloc to
# reuse memory (batches of 1000 ResNet-20 activations cost more in page faults than compute)


def test_loader(loaded: Loaded, batch_size: int = EVAL_BATCH):
    return make_loader(loaded.bundle, False, batch_size, loaded.device, False, 0, 0)


def train_loader(loaded: Loaded, batch_size: int | None = None):
    """Shuffled training batches; a run's own augmentation and seed (a user's model: no
    augmentation, seed 0, since how it was trained is not known)."""
    cfg = loaded.cfg
    augment, seed = (cfg.augment, cfg.seed) if cfg is not None else (False, 0)
    return make_loader(loaded.bundle, True, batch_size or loaded.batch_size, loaded.device,
                       augment, seed, 0)


def shuffled_order(n: int, seed: int = 0) -> torch.Tensor:
    """The fixed random order in which the analyses read a test set of n images."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def shuffled_test_loader(loaded: Loaded, batch_size: int = EVAL_BATCH, seed: int = 0):
    """The test set in one fixed random order (stored test sets may be sorted by class, and
    a batch of one class has other statistics than the data)."""
    bundle = loaded.bundle
    order = shuffled_order(len(bundle.test), seed)
    test = bundle.test.subset(order) if isinstance(bundle.test, Split) else \
        torch.utils.data.Subset(bundle.test, order.tolist())
    return make_loader(replace(bundle, test=test), False, batch_size, loaded.device, False, 0,
                       0 if isinstance(bundle.test, Split) else min(4, loaded.workers))


def shuffled_test_batches(loaded: Loaded, batch_size: int = EVAL_BATCH, max_images: int = 0,
                          transform=None):
    """Images of shuffled_test_loader (the first `max_images`, 0: all), each batch through
    `transform` when given, for estimating batch statistics: a batch of a single image is
    left out, since after a linear layer or on a 1x1 map it holds one value per channel."""
    done = 0
    for x, _ in shuffled_test_loader(loaded, batch_size).epoch(0):
        if max_images and done + len(x) > max_images:
            x = x[: max_images - done]
        if len(x) > 1:
            yield x if transform is None else transform(x)
        done += len(x)
        if max_images and done >= max_images:
            return


@torch.no_grad()
def predict(model: nn.Module, loader, transform=None,
            precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels over a loader, model in its current mode; images in
    the model's layout (channels_last where its convolutions' weights are), the forward pass
    in `precision` (bf16: autocast, as the run evaluated).

    `transform(x)` maps each normalized batch before the forward pass (corruptions).
    """
    outs, ys = [], []
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    last = weight is not None and not weight.is_contiguous() and weight.is_contiguous(
        memory_format=torch.channels_last)
    for x, y in loader.epoch(0):
        if transform is not None:
            x = transform(x)
        if last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, precision):
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
