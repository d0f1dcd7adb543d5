"""ONNX export of a (folded) model and its check with onnxruntime (optional extra `onnx`)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from bnlab.errors import UserError
from bnlab.store import atomic_write_bytes


def onnx_available() -> str | None:
    """None when onnx, onnxruntime and onnxscript import, else the name of the missing one."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            return name
    return None


def require_onnx() -> None:
    """Refuse (one line) when a package of the optional extra `onnx` does not import."""
    missing = onnx_available()
    if missing:
        raise UserError(f"--onnx needs the optional package {missing!r} "
                        "(pip install 'bnlab[onnx]')")


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path,
                dynamo: bool = True) -> Path:
    """Export an eval-mode model to ONNX at `path` (written atomically), batch dim dynamic.

    dynamo=True uses torch.export (the maintained exporter); dynamo=False the TorchScript
    exporter, deprecated by PyTorch but ~40x faster to run (used by the quick tests).
    """
    require_onnx()
    model = model.eval().cpu()
    example = example.detach().cpu().float()
    names = {"input_names": ["images"], "output_names": ["logits"]}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        try:
            _export(model, example, tmp_path, dynamo, names)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the exporters raise many kinds of errors
            text = str(e).strip().splitlines()
            raise UserError(f"cannot export {type(model).__name__} to ONNX: {type(e).__name__}"
                            f"{': ' + text[0][:200] if text else ''}") from None
        data = tmp_path.read_bytes()
        extra = [p for p in Path(tmp).iterdir() if p.name != "model.onnx"]
        if extra:  # weights stored as external data: not a single self-contained file
            raise UserError(f"the ONNX export of this model needs external data files "
                            f"({extra[0].name}); not supported by --onnx")
        atomic_write_bytes(Path(path), data)
    return Path(path)


ONNX_LIMIT = 1e-4  # max |logit difference| / max |logit| accepted from onnxruntime: its
# kernels sum in other orders than PyTorch's, so it gets ten times the eager limit of fold.py


def _export(model: nn.Module, example: torch.Tensor, path: Path, dynamo: bool,
            names: dict) -> None:
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=65536)
        try:
            torch.onnx.export(model, (example,), str(path), dynamic_shapes=({0: batch},),
                              dynamo=True, verbose=False, external_data=False, **names)
        except TypeError:  # a torch without the external_data argument
            torch.onnx.export(model, (example,), str(path), dynamic_shapes=({0: batch},),
                              dynamo=True, verbose=False, **names)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(model, (example,), str(path), dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          **names)


@torch.no_grad()
def onnx_parity(path: str | Path, model: nn.Module, loader) -> dict:
    """Max |logit difference| of onnxruntime (CPU) vs the PyTorch model over a loader, that
    maximum over the largest |logit| of the model, and whether it is within ONNX_LIMIT."""
    import onnxruntime as ort  # optional: the onnx extra

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    max_abs, max_logit, n = 0.0, 0.0, 0
    model = model.cpu().eval()
    for x, _ in loader.epoch(0):
        x = x.float().cpu().contiguous()
        ref = model(x).float()
        out = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
        max_abs = max(max_abs, float((out - ref).abs().max()))
        max_logit = max(max_logit, float(ref.abs().max()))
        n += len(x)
    rel = max_abs / max_logit if max_logit else 0.0
    return {"max_abs_diff": max_abs, "rel_diff": rel, "n_images": n, "path": str(path),
            "limit": ONNX_LIMIT, "ok": rel <= ONNX_LIMIT}
