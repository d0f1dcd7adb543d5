"""A user's own model for the inference tools: an entry point, a state_dict and a dataset.

`--model-entry package.module:function` (or `path/to/file.py:function`) names a function that
takes no arguments and returns a torch.nn.Module; the module is imported as Python would from
the current folder, a file as `python path/to/file.py` would run it (its folder first on
sys.path, so it imports its siblings; bnlab.usercode, which training's entry models share).
The weights come from a state_dict file read with
torch.load(weights_only=True) (a dict of tensors; one nested under "state_dict" or "model" is
accepted too). The dataset is any bnlab dataset spec; the model receives its images normalized
by the training set's per-channel mean and std, as bnlab's own models do.

Every way this can go wrong is a UserError of one line naming the bad value.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from bnlab.data import DataBundle, load_data
from bnlab.errors import UserError
from bnlab.infer.loading import USER_BATCH, Loaded, test_loader
from bnlab.runtime import resolve_device
from bnlab.store import load_tensors
from bnlab.usercode import first_line as _first_line
from bnlab.usercode import load_function, script_folder, split_entry, user_failure


def build_entry(entry: str) -> nn.Module:
    """Call the function `entry` names and check that it returned an nn.Module."""
    label = f"--model-entry {entry!r}"
    module, name = split_entry(entry, label)
    with script_folder(module):
        fn = load_function(module, name, label)
        try:
            model = fn()
        except BaseException as e:  # anything the user's function raises, exit included
            if not user_failure(e):
                raise
            raise UserError(f"--model-entry {entry!r}: calling {name}() raised "
                            f"{_first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{label} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--weights {str(p)!r} is a folder; give the state_dict file saved "
                        "by torch.save (for a bnlab run, its checkpoint.pt)")
    if not p.is_file():
        raise UserError(f"--weights {str(p)!r} does not exist")
    state = load_tensors(p, "--weights")
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not (isinstance(state, dict) and state
            and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                    for k, v in state.items())):
        raise UserError(f"--weights {str(p)!r} holds a {type(state).__name__}, not a "
                        "state_dict (a dict of parameter names to tensors)")
    return state


def load_user_model(entry: str, weights: str | Path, dataset: str | DataBundle,
                    data_dir: str | None = None, device: str = "cpu",
                    batch_size: int = USER_BATCH, limit_test: int = 0, mean=None,
                    std=None) -> Loaded:
    """Build the model of `entry`, load `weights` into it (strictly) and the dataset (a spec,
    or a loader's images as with_batches takes them)."""
    model = build_entry(entry)
    state = read_state_dict(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
        raise UserError(f"--weights {str(weights)!r} does not fit the model of {entry!r}: "
                        f"{' '.join(lines[:2])[:240]}") from None
    if isinstance(dataset, DataBundle):
        return with_batches(model, Path(weights), entry, dataset, device, batch_size)
    return with_dataset(model, Path(weights), entry, dataset, data_dir, device, batch_size,
                        limit_test, mean, std)


def normalized_by(bundle, mean, std, dataset: str):
    """`bundle` whose images are normalized by `mean` and `std` (None: its own)."""
    if mean is None and std is None:
        return bundle
    mean = tuple(bundle.mean) if mean is None else tuple(float(v) for v in mean)
    std = tuple(bundle.std) if std is None else tuple(float(v) for v in std)
    for name, v in (("--mean", mean), ("--std", std)):
        if len(v) not in (1, bundle.in_channels):
            raise UserError(f"{name} has {len(v)} values; dataset {dataset!r} has "
                            f"{bundle.in_channels} channels (give 1 or {bundle.in_channels})")
    if any(s <= 0 for s in std):
        raise UserError(f"--std must be > 0 for every channel, got {list(std)}")
    if bundle.streamed:
        raise UserError(f"--mean/--std apply to datasets held in memory; {dataset!r} is "
                        "streamed with its own transforms")
    c = bundle.in_channels
    return dataclasses.replace(bundle, mean=mean * c if len(mean) == 1 else mean,
                               std=std * c if len(std) == 1 else std)


def with_dataset(model: nn.Module, path: Path, entry: str, dataset: str,
                 data_dir: str | None = None, device: str = "cpu",
                 batch_size: int = USER_BATCH, limit_test: int = 0,
                 mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None) -> Loaded:
    """A model (moved to `device`, eval mode) with the dataset it is analysed on, checked on
    two test images: its output must be logits of shape (2, classes). `path` and `entry` name
    it in messages and results. `mean`/`std` (per channel, of images scaled to [0, 1]) replace
    the training set's as the normalization of the images the model receives."""
    bundle = load_data(dataset, data_dir, False, 0, limit_test, False)
    bundle = normalized_by(bundle, mean, std, dataset)
    return _checked(Loaded(path, None, model, bundle, resolve_device(device), entry,
                           batch_size), f"dataset {dataset!r}")


def with_batches(model: nn.Module, path: Path, entry: str, bundle: DataBundle,
                 device: str = "cpu", batch_size: int = USER_BATCH) -> Loaded:
    """A model (moved to `device`, eval mode) with the images of a loader given from Python
    (`bundle`: bnlab.data.bundle.tensor_bundle, both its training and its test set), checked
    as with_dataset checks; the classes are as many as the model's logits (at least one more
    than the largest label)."""
    loaded = Loaded(path, None, model, bundle, resolve_device(device), entry, batch_size,
                    user_workers=0)
    return _checked(loaded, "the loader's images", widen=True)


def _checked(loaded: Loaded, what: str, widen: bool = False) -> Loaded:
    """`loaded` with its model moved to the device and in eval mode, after one forward pass on
    two test images: a UserError unless it returns logits (2, classes). `widen`: classes are
    labels only, and a model with more logits than that is given as many classes."""
    loaded.model = loaded.model.to(loaded.device).eval()
    bundle, entry = loaded.bundle, loaded.entry
    x, _ = next(iter(test_loader(loaded, 2).epoch(0)))
    try:
        with torch.no_grad():
            out = loaded.model(x)
    except BaseException as e:  # anything the user's forward raises, exit included
        if not user_failure(e):
            raise
        raise UserError(f"the model of {entry!r} fails on images of {what} "
                        f"(shape {tuple(x.shape)}): {_first_line(e)}") from None
    if widen and isinstance(out, torch.Tensor) and out.ndim == 2 \
            and out.shape[1] > bundle.num_classes:
        loaded.bundle = bundle = dataclasses.replace(
            bundle, classes=[str(k) for k in range(out.shape[1])])
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != bundle.num_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        need = "at least " if widen else ""
        raise UserError(f"the model of {entry!r} returns {shape} for {len(x)} images; "
                        f"{what} need{'' if widen else 's'} logits of shape ({len(x)}, "
                        f"{need}{bundle.num_classes})")
    return loaded


__all__ = ["build_entry", "load_user_model", "normalized_by", "read_state_dict",
           "with_batches", "with_dataset"]
