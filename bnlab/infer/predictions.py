"""What a comparison needs of one model, computed once and cached in its run folder.

Every forward pass runs in the precision the run trained and evaluated in (bf16 autocast for a
bf16 run, Loaded.precision), so a run's clean test accuracy here is the one its training
recorded. `run_predictions(loaded)` returns the model's clean test logits and labels, its
accuracy under
every corruption and severity with its stored (training) statistics, and, for a model whose
norm layers use batch statistics, the same accuracies after AdaBN: the statistics of those
layers re-estimated on the corrupted test images themselves (Li et al. 2016; Schneider et al.
2020), then evaluated on those images. A model without batch statistics (norm none, group,
layer, frozen, ...) has nothing to adapt and gets None.

AdaBN here: for each corruption and severity, one pass over the corrupted test set in a fixed
shuffled order (batches of EVAL_BATCH, norms normalizing with batch statistics; a trailing
batch of one image left out) pools the mean and biased variance of every such layer's input
over the test images
(bnlab.infer.batchstats.adapted_copy); a second pass evaluates the adapted copy on the same
corrupted images (the noise generator restarts). The model's own statistics never change.

The result is cached as predictions.pt in a bnlab run folder (written atomically), keyed by
the checkpoint's SHA-256, the test set's fingerprint and PROTOCOL, so a study compares every
pair of its runs from one pass per run, and a second comparison of the same runs recomputes
nothing. Logits are cached up to CACHE_LOGITS_MAX values (larger ones are predicted again: one
pass, against the 20 to 62 of the corruption sweep).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import torch

from bnlab.infer import metrics as M
from bnlab.infer.batchstats import adapted_copy, adapted_to_test, batch_stat_layers
from bnlab.infer.corrupt import CORRUPTIONS, NOISE_SEED, SEVERITIES, corrupt, noise_generator
from bnlab.infer.loading import (
    EVAL_BATCH,
    Loaded,
    from_unit,
    predict,
    shuffled_test_batches,
    shuffled_test_loader,
    test_loader,
    to_unit,
)
from bnlab.store import atomic_write_bytes

PROTOCOL = 2  # raise when what a cached entry means changes (2: in the run's precision)
CACHE_FILE = "predictions.pt"
CACHE_LOGITS_MAX = 10_000_000  # logits values (40 MB in float32) kept in the cache


def test_fingerprint(loaded: Loaded) -> tuple:
    """Class names, test size, and a SHA-256 of the test labels and images."""
    h = hashlib.sha256()
    n = 0
    for x, y in test_loader(loaded).epoch(0):
        h.update(y.cpu().numpy().tobytes())
        h.update(x.float().cpu().numpy().tobytes())
        n += len(y)
    return tuple(loaded.bundle.classes), n, h.hexdigest()


def _corrupter(loaded: Loaded, name: str, severity: int) -> Callable:
    g = noise_generator(name, severity)

    def tf(x):
        return from_unit(corrupt(to_unit(x, loaded.bundle), name, severity, g), loaded.bundle, x)
    return tf


def corruption_accuracy(loaded: Loaded, adabn: bool = False, batch_size: int = EVAL_BATCH,
                        log=print) -> dict[str, list[float]]:
    """Accuracy at severities 1..5 of each corruption, on the test set in its fixed shuffled
    order (the same noise for every model), with the stored statistics or (adabn=True) with
    statistics re-estimated on the corrupted images (module docstring)."""
    out = {}
    for name in CORRUPTIONS:
        accs = []
        for s in range(1, SEVERITIES + 1):
            model = loaded.model
            if adabn:
                model = adapted_copy(model, shuffled_test_batches(
                    loaded, batch_size, transform=_corrupter(loaded, name, s)))
            logits, y = predict(model, shuffled_test_loader(loaded, batch_size),
                                _corrupter(loaded, name, s), loaded.precision)
            accs.append(M.accuracy(logits, y))
        out[name] = accs
        log(f"  {name}{' (AdaBN)' if adabn else ''}: "
            + " ".join(f"{a:.3f}" for a in accs))
    return out


def _checkpoint_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_cache(path: Path, key: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
        return None
    return data if isinstance(data, dict) and data.get("key") == key else None


def run_predictions(loaded: Loaded, corruptions: bool = True, fingerprint: tuple | None = None,
                    log=print) -> dict:
    """{"logits", "labels", "corruption_acc", "adabn_acc", "adabn_clean_acc",
    "batch_stat_layers"} of one model (module docstring); the corruption entries are None
    when `corruptions` is False, the AdaBN ones when the model has nothing to adapt."""
    run = loaded.run_dir
    fp = fingerprint or test_fingerprint(loaded)
    key = {"protocol": PROTOCOL, "checkpoint": _checkpoint_sha(loaded.path) if run else None,
           "test": fp[2], "noise_seed": NOISE_SEED, "eval_batch": EVAL_BATCH}
    cache = run.path / CACHE_FILE if run is not None else None
    old = _read_cache(cache, key) if cache is not None else None
    if old is not None and (old.get("corruption_acc") is not None or not corruptions):
        out = dict(old)
        if out.get("logits") is None:
            out["logits"], out["labels"] = predict(loaded.model, test_loader(loaded),
                                                   precision=loaded.precision)
        if not corruptions:
            out.update(corruption_acc=None, adabn_acc=None, adabn_clean_acc=None)
        return out
    logits, labels = predict(loaded.model, test_loader(loaded), precision=loaded.precision)
    layers = len(batch_stat_layers(loaded.model))
    out = {"logits": logits, "labels": labels, "batch_stat_layers": layers,
           "corruption_acc": None, "adabn_acc": None, "adabn_clean_acc": None}
    if corruptions:
        out["corruption_acc"] = corruption_accuracy(loaded, log=log)
        if layers:
            out["adabn_clean_acc"] = M.accuracy(*predict(adapted_to_test(loaded),
                                                         test_loader(loaded),
                                                         precision=loaded.precision))
            out["adabn_acc"] = corruption_accuracy(loaded, adabn=True, log=log)
    if cache is not None:
        keep = logits.numel() <= CACHE_LOGITS_MAX
        stored = {**out, "key": key, "logits": logits if keep else None,
                  "labels": labels if keep else None}
        buf = io.BytesIO()
        torch.save(stored, buf)
        atomic_write_bytes(cache, buf.getvalue())
    return out


__all__ = ["CACHE_FILE", "corruption_accuracy", "run_predictions", "test_fingerprint"]
