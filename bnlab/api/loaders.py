"""Data given to the inference tools as a DataLoader (any iterable of batches): checked, and
read into memory as the model takes it. A loader's images are used as they come (no
normalization is applied); a batch that is not what a tool needs is one UserError line."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from bnlab.api import checks
from bnlab.data.bundle import DataBundle, tensor_bundle
from bnlab.errors import UserError

LOADER_NAME = "<loader>"  # the dataset name of a loader's images in results


def is_loader(value: Any) -> bool:
    """An iterable of batches (a DataLoader, a list, a generator), not a path, text, tensor
    or mapping, which are iterable too."""
    return isinstance(value, Iterable) and not isinstance(
        value, str | bytes | os.PathLike | torch.Tensor | Mapping)


def checked_data(data: Any, loaders: bool = True) -> Any:
    """`data` checked: None, a dataset spec, or (`loaders`) a loader, read later by _images."""
    if data is None or (isinstance(data, str) and data) or (loaders and is_loader(data)):
        return data
    accepted = ", or a DataLoader (an iterable of (images, labels) batches)" if loaders else ""
    raise UserError(f"data must be a dataset spec (cifar10, mnist, imagefolder:PATH, "
                    f"synthetic, ...){accepted}, got {checks.shown(data)}")


def loader_images(data: Any) -> tuple[str | DataBundle | None, int | None]:
    """A checked `data` ready for loading: a loader's batches read once into memory (as the
    model takes them: no normalization is applied) as a bundle whose training and test sets
    are both those images, with the size of its first batch; a spec as it is."""
    if data is None or isinstance(data, str):
        return data, None
    xs, ys = [], []
    for x, y in batches_of(data, "data", None, None, labelled=True):
        xs.append(x.detach().cpu())
        ys.append(y.detach().cpu().long())
    if not xs:
        raise UserError("data (a loader) yielded no batch; it needs (images, labels) batches")
    try:
        x = torch.cat(xs)
    except RuntimeError:
        shapes = sorted({tuple(b.shape[1:]) for b in xs})[:2]
        raise UserError(f"data's batches hold images of different shapes {shapes}; every "
                        "image of a loader must have one shape") from None
    return tensor_bundle(x, torch.cat(ys), LOADER_NAME), len(xs[0])


def batches_of(loader: Iterable, name: str, device: torch.device | None, limit: int | None,
             labelled: bool = False):
    """The batches of `loader` (checked by is_loader), the first `limit` of them: their
    inputs moved to `device` (None: where they are), or with `labelled` (inputs, labels)
    pairs; a batch that is neither is a one-line UserError naming it."""
    for i, b in enumerate(loader):
        if limit is not None and i >= limit:
            return
        x = b[0] if isinstance(b, list | tuple) and b else b
        if not labelled:
            if not isinstance(x, torch.Tensor):
                raise UserError(f"{name} must yield tensors or (inputs, ...) tuples, got a "
                                f"{type(x).__name__} in batch {i}")
            yield x if device is None else x.to(device)
            continue
        y = b[1] if isinstance(b, list | tuple) and len(b) > 1 else None
        if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim >= 2
                and isinstance(y, torch.Tensor) and y.ndim == 1 and len(y) == len(x) > 0
                and not y.is_floating_point() and not y.is_complex()
                and y.dtype != torch.bool and int(y.min()) >= 0):
            raise UserError(f"{name} must yield (images, labels) batches: images a float "
                            f"tensor (N, C, ...), labels integers >= 0 (N,); got "
                            f"{described(b)} in batch {i}")
        yield (x if device is None else x.to(device)), y


def described(batch: Any) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"a {str(v.dtype).removeprefix('torch.')} tensor {tuple(v.shape)}"
        return f"a {type(v).__name__}"

    if isinstance(batch, list | tuple):
        return f"({', '.join(one(v) for v in batch[:3])}{', ...' if len(batch) > 3 else ''})"
    return one(batch)
