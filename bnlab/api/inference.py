"""What BN does at inference, from Python: `bnlab compare`, `diagnose`, `fold`, and the
recalibration of a model's BN statistics.

A model is given as a run folder or its checkpoint.pt (a bnlab run brings its dataset), a
`UserModel` (the command line's --model-entry and --weights), or an nn.Module in memory; the
last two need `data`, a dataset spec (cifar10, mnist, imagefolder:PATH, synthetic, ...) whose
images the model receives normalized by the training set's per-channel mean and std. A model
passed in is never changed: the tools work on a copy.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.api import checks
from bnlab.api.frames import frame
from bnlab.api.loaders import batches_of, checked_data, is_loader, loader_images
from bnlab.config import DEVICES
from bnlab.data.bundle import DataBundle
from bnlab.errors import UserError
from bnlab.infer.batchstats import DEFINITIONS, precise_statistics, with_statistics
from bnlab.infer.compare import compare_models, format_compare
from bnlab.infer.diagnose import BATCH_SIZES, PRECISE_BATCHES, train_batches
from bnlab.infer.diagnose import diagnose as diagnose_loaded
from bnlab.infer.diagnose_text import format_diagnose
from bnlab.infer.fold_report import OneBatch, failure, fold_and_time, fold_result, format_fold
from bnlab.infer.loading import USER_BATCH, Loaded, load_model
from bnlab.infer.usermodel import load_user_model, with_batches, with_dataset
from bnlab.runtime import resolve_device
from bnlab.store import RunDir, atomic_write_bytes


@dataclass(frozen=True)
class UserModel:
    """Your own model as `--model-entry MODULE:FUNCTION --weights FILE` give it: a function
    (package.module:function or path/to/file.py:function) returning an nn.Module, and a
    state_dict file read with torch.load(weights_only=True)."""

    entry: str
    weights: str | Path


def _loaded(model: Any, data: str | DataBundle | None, data_dir: str | None, device: str,
            batch_size: int, index: int | None = None, mean=None, std=None) -> Loaded:
    """The model, loaded for analysis (a copy when it is an nn.Module); `data` a dataset spec
    or a loader's images (_images); `mean`/`std` replace the normalization of your own model's
    images of a dataset spec."""
    if isinstance(data, DataBundle) and (mean is not None or std is not None):
        raise UserError("mean/std normalize the images of a dataset spec; a loader's images "
                        "reach the model as the loader yields them")
    if isinstance(model, nn.Module):
        if data is None:
            raise UserError(f"an nn.Module ({type(model).__name__}) needs data=, the dataset "
                            "spec of its images (cifar10, mnist, imagefolder:PATH, ...) or a "
                            "DataLoader of (images, labels)")
        try:
            mine = copy.deepcopy(model)
        except Exception as e:  # noqa: BLE001 - whatever the user's module does on copy
            raise UserError(f"the model {type(model).__name__} cannot be copied (the tools "
                            f"never change the model passed in): {type(e).__name__}: "
                            f"{str(e)[:160]}") from None
        name = type(model).__name__
        path = Path(f"model{index}" if index is not None else f"<{name}>")
        if isinstance(data, DataBundle):
            return with_batches(mine, path, name, data, device, batch_size)
        return with_dataset(mine, path, name, data, data_dir, device, batch_size, 0, mean, std)
    if isinstance(model, UserModel):
        if data is None:
            raise UserError("your own model needs --model-entry MODULE:FUNCTION, --weights "
                            "FILE and --dataset SPEC; missing --dataset (data= in Python)")
        checks.text("the model entry", model.entry)
        checks.folder("the weights file", model.weights)
        return load_user_model(model.entry, model.weights, data, data_dir, device, batch_size,
                               0, mean, std)
    if isinstance(model, str | Path) and str(model):
        if data is not None:
            given = repr(data) if isinstance(data, str) else "a loader"
            raise UserError(f"give a CHECKPOINT or your own model, not both: {str(model)!r} is "
                            f"a bnlab run, which brings its own dataset (got data={given})")
        if mean is not None or std is not None:
            raise UserError(f"--mean/--std are for your own model; {str(model)!r} is a bnlab "
                            "run, normalized as it was trained")
        return load_model(model, data_dir, device)
    raise UserError(f"a model is a run folder or checkpoint.pt, a bnlab.UserModel or a "
                    f"torch.nn.Module, got {checks.shown(model)}")


def _common(data, data_dir, device, batch_size, loaders: bool = True
            ) -> tuple[Any, str | None, str, int | None]:
    return (checked_data(data, loaders),
            None if data_dir is None else str(checks.folder("data_dir", data_dir)),
            checks.choice("device", device, DEVICES),
            None if batch_size is None else checks.integer("batch_size", batch_size, 2))


class Comparison(dict):
    """compare.json's content; text() is what `bnlab compare` prints, frame() one row per
    model (its scalar results), `written` the files written."""

    written: list[Path]

    def text(self) -> str:
        return format_compare(self)

    def frame(self):
        return frame([{k: v for k, v in r.items() if not isinstance(v, dict | list)}
                      for r in self["runs"]], ["run_id", "arm"])


def compare(models: Iterable, data: Any = None, *, out: str | Path | None = None,
            labels: list[str] | None = None, data_dir: str | None = None,
            device: str = "cpu", corruptions: bool | None = None,
            batch_size: int | None = None,
            log: Callable[[str], None] | None = None) -> Comparison:
    """`bnlab compare`: the predictions of `models` on their common test set compared
    (accuracy, calibration, agreement, corruptions), compare.json and figures written to `out`
    (default: the first run folder's output root /analysis). `data` (for models that are not
    runs): a dataset spec, or a DataLoader of (images, labels) whose images are the test set
    as the models take them. `corruptions` (default: on, except for a loader, whose images'
    scale is not known, so that they cannot be corrupted as images in [0, 1])."""
    if isinstance(models, str | Path | nn.Module | UserModel) or \
            not isinstance(models, Iterable):
        raise UserError(f"compare takes a list of models (run folders, bnlab.UserModel or "
                        f"nn.Module), got {checks.shown(models)}")
    models = list(models)
    if not models:
        raise UserError("compare needs at least one run folder (two or more to compare)")
    data, data_dir, device, batch_size = _common(data, data_dir, device, batch_size)
    out = checks.folder("out", out, optional=True)
    labels = checks.strings("labels", labels)
    if corruptions is None:
        corruptions = data is None or isinstance(data, str)
    corruptions = checks.flag("corruptions", corruptions)
    if corruptions and is_loader(data):
        raise UserError("corruptions=True needs images in [0, 1] and their normalization: a "
                        "dataset spec; a loader's images are used as they come (corruptions="
                        "False)")
    log = checks.callable_or_none("log", log)
    runs = []
    for m in models:
        if isinstance(m, str | Path) and str(m):
            p = Path(m)
            run = RunDir(p.parent if p.is_file() else p)
            if not run.exists():
                raise UserError(f"{str(m)!r} is not a run folder (no config.json)")
            runs.append(run)
    if out is None:
        if not runs:
            raise UserError("comparing your own models needs --out DIR (out= in Python): "
                            "where compare.json goes")
        out = runs[0].path.parent / "analysis"
    data, first = loader_images(data)  # a loader is read once, for every model
    batch_size = batch_size or first or USER_BATCH
    loaded, it = [], iter(runs)
    for i, m in enumerate(models, 1):
        if isinstance(m, str | Path):
            loaded.append(load_model(next(it).path, data_dir, device))
        else:
            loaded.append(_loaded(m, data, data_dir, device, batch_size, index=i))
    res = Comparison(compare_models(loaded, out, labels, corruptions, log or (lambda m: None)))
    res.written = [out / "compare.json", *(out / f for f in res.get("figures", []))]
    return res


class Diagnosis(dict):
    """diagnose.json's content; text() is what `bnlab diagnose` prints, frame() one row per
    batch-statistics layer (running vs recomputed statistics), `written` diagnose.json's path
    in a run folder (None for other models), `recalibrated` the file of write_recalibrated."""

    written: Path | None = None
    recalibrated: Path | None = None

    def text(self) -> str:
        return format_diagnose(self)

    def frame(self):
        gaps = {g["layer"]: g for g in self.get("precise", {}).get("gaps", [])}
        rows = [gaps[name] for name in self.get("precise", {}).get("ranking", [])]
        return frame(rows, ["layer", "values_per_channel", "kl_mean", "kl_max",
                            "mean_shift_mean", "mean_shift_max", "var_logratio_mean",
                            "var_logratio_max"])


def diagnose(model, data: Any = None, *, batch_sizes: Iterable[int] = BATCH_SIZES,
             precise_batches: int = PRECISE_BATCHES, max_images: int = 0,
             data_dir: str | None = None, device: str = "cpu",
             batch_size: int | None = None, mean: Iterable[float] | None = None,
             std: Iterable[float] | None = None,
             write_recalibrated: str | Path | None = None) -> Diagnosis:
    """`bnlab diagnose`: BN at inference (train vs eval mode, batch-size dependence, PreciseBN,
    statistics checks, an answer), also written to a run folder's diagnose.json. `mean`/`std`
    (per channel, of images in [0, 1]) normalize your own model's images instead of the
    dataset's statistics; `write_recalibrated` saves the model's state_dict with the pooled
    statistics of the same PreciseBN batches (recalibrate) to that file.

    `data` (for a model that is not a run): a dataset spec, or a DataLoader of (images,
    labels) batches as the model takes them, read once into memory; its images are then both
    the test images and those PreciseBN reads, in batches of `batch_size` (default: the
    loader's; for a dataset spec 128)."""
    sizes = checks.positive_ints("batch_sizes", list(batch_sizes)
                                 if isinstance(batch_sizes, tuple | range) else batch_sizes)
    precise_batches = checks.integer("precise_batches", precise_batches, 0)
    max_images = checks.integer("max_images", max_images, 0)
    data, data_dir, device, batch_size = _common(data, data_dir, device, batch_size)
    mean, std = _floats("mean", mean), _floats("std", std)
    target = checks.folder("write_recalibrated", write_recalibrated, optional=True)
    if target is not None and precise_batches == 0:
        raise UserError("--write-recalibrated needs PreciseBN: --precise-batches > 0")
    data, first = loader_images(data)
    loaded = _loaded(model, data, data_dir, device, batch_size or first or USER_BATCH,
                     mean=mean, std=std)
    res = Diagnosis(diagnose_loaded(loaded, sizes, precise_batches, max_images,
                                    log=lambda m: None))
    if target is not None:
        fresh = recalibrate(loaded.model, train_batches(loaded, precise_batches), "pooled")
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in fresh.state_dict().items()}, buf)
        atomic_write_bytes(target, buf.getvalue())
        res.recalibrated = target
    run = loaded.run_dir
    if run is not None:
        run.write_json("diagnose.json", dict(res))
        res.written = run.path / "diagnose.json"
    return res


def _floats(name: str, value) -> tuple[float, ...] | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, list | tuple) else None
    if not items or not all(isinstance(v, int | float) and not isinstance(v, bool)
                            and v == v and abs(v) != float("inf") for v in items):
        raise UserError(f"{name} must be a list of numbers, one per channel (or one for all), "
                        f"got {checks.shown(value)}")
    return tuple(float(v) for v in items)


class Folding(dict):
    """fold.json's content; text() is what `bnlab fold` prints, frame() one row per timed
    device and batch, `folded` the folded model, `failure` the line that fails the command
    (None when every parity check passed), `ok`, `written` fold.json's path in a run folder."""

    folded: nn.Module
    written: Path | None = None

    @property
    def failure(self) -> str | None:
        return failure(self)

    @property
    def ok(self) -> bool:
        return self.failure is None

    def text(self) -> str:
        return format_fold(self)

    def frame(self):
        rows = [{"device": s["device"], "batch": s["batch"],
                 "unfolded_ms": s["unfolded"]["median_s"] * 1e3,
                 "folded_ms": s["folded"]["median_s"] * 1e3, "speedup": s["speedup"]}
                for s in self["speed"]]
        return frame(rows, ["device", "batch", "unfolded_ms", "folded_ms", "speedup"])


def fold(model, example_input: torch.Tensor | None = None, *, data: str | None = None,
         onnx: str | Path | None = None, repeats: int = 20, data_dir: str | None = None,
         device: str = "cpu") -> Folding:
    """`bnlab fold`: every BN after a conv/linear layer folded into it, the logits checked
    against the unfolded model (over the test set, or on `example_input` for an nn.Module
    without data), both timed, optionally exported to ONNX and checked with onnxruntime."""
    repeats = checks.integer("repeats", repeats, 1)
    onnx = checks.folder("onnx", onnx, optional=True)
    data, data_dir, device, _ = _common(data, data_dir, device, USER_BATCH, loaders=False)
    if example_input is not None:
        if not isinstance(model, nn.Module) or data is not None:
            raise UserError("example_input is for an nn.Module without data= (a run or data= "
                            "brings its own test images)")
        if not isinstance(example_input, torch.Tensor) or example_input.ndim < 2 \
                or not example_input.is_floating_point() or len(example_input) < 1:
            raise UserError(f"example_input must be a float tensor of a batch of inputs "
                            f"(N, ...), got {checks.shown(example_input)}")
        if onnx is not None:
            raise UserError("onnx= needs a run or data=, whose test images check the export")
        dev = resolve_device(device)
        mine = _copy_eval(model).to(dev)
        x = example_input.detach().to(dev)
        name = type(model).__name__
        head = {"checkpoint": f"<{name}>", "model": name, "norm": "as defined by the model"}
        try:
            rep, folded = fold_and_time(mine, dev, x, OneBatch(x), head, repeats)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's forward on the user's input
            raise UserError(f"the model {name} fails on example_input of shape "
                            f"{tuple(x.shape)}: {type(e).__name__}: {str(e)[:160]}") from None
        res = Folding(rep)
    else:
        loaded = _loaded(model, data, data_dir, device, USER_BATCH)
        rep, folded = fold_result(loaded, None if onnx is None else str(onnx), repeats)
        res = Folding(rep)
        run = loaded.run_dir
        if run is not None:
            run.write_json("fold.json", dict(res))
            res.written = run.path / "fold.json"
    res.folded = folded
    return res


def _copy_eval(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model).eval()
    except Exception as e:  # noqa: BLE001
        raise UserError(f"the model {type(model).__name__} cannot be copied (the tools never "
                        f"change the model passed in): {type(e).__name__}") from None


def recalibrate(model: nn.Module, loader: Iterable, definition: str = "pooled",
                batches: int | None = None) -> nn.Module:
    """A copy of `model` (eval mode) whose BN layers hold statistics recomputed over
    `loader` (a DataLoader or any iterable of input batches or (inputs, labels) tuples; the
    first `batches` of it when given), every norm normalizing with batch statistics as in
    training (bnlab.infer.batchstats):

        pooled  mean and biased variance of all values the layer saw (one population)
        fvcore  equal-weight average of the per-batch means and unbiased variances (fvcore's
                update_bn_stats; torch.optim.swa_utils.update_bn computes the same)

    `model` is unchanged."""
    if not isinstance(model, nn.Module):
        raise UserError(f"recalibrate takes a torch.nn.Module, got {checks.shown(model)}")
    definition = checks.choice("definition", definition, DEFINITIONS)
    if batches is not None:
        batches = checks.integer("batches", batches, 1)
    if not is_loader(loader):
        raise UserError(f"loader must be a DataLoader or an iterable of batches, got "
                        f"{checks.shown(loader)}")
    mine = _copy_eval(model)
    param = next(iter(mine.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    stats = precise_statistics(mine, batches_of(loader, "loader", device, batches))
    if not stats:
        raise UserError("recalibrate found nothing to recompute: the model has no layer that "
                        "normalizes with batch statistics, or the loader yielded no batch")
    return with_statistics(mine, stats, definition)
