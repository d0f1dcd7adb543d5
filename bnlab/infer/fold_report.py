"""`bnlab fold`: fold a checkpoint's BN layers, check parity and speed, optionally export ONNX."""

from __future__ import annotations

import torch
from torch import nn

from bnlab.console import format_table
from bnlab.infer.export import export_onnx, onnx_parity, require_onnx
from bnlab.infer.fold import fold_model, parity, speed
from bnlab.infer.loading import Loaded, test_loader


def _example(loaded, n: int = 256) -> torch.Tensor:
    xs, got = [], 0
    for x, _ in test_loader(loaded, n).epoch(0):
        xs.append(x)
        got += len(x)
        if got >= n:
            break
    return torch.cat(xs)[:n]


class OneBatch:
    """A loader of one batch (an example input given in place of a test set)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def epoch(self, epoch: int):
        yield self.x, None


def fold_and_time(model: nn.Module, device: torch.device, example: torch.Tensor, loader,
                  head: dict, repeats: int = 20) -> tuple[dict, nn.Module]:
    """Fold an eval-mode `model` (on `device`), parity over `loader`, and speed on `example`
    on the CPU (and CUDA when present); returns (the report, the folded model on `device`).
    `model` ends on `device` again."""
    folded, info = fold_model(model)
    res = {**head, **info, "parity": parity(model, folded, loader), "speed": []}
    cpu_model, cpu_folded = model.cpu(), folded.cpu()
    res["speed"] += speed(cpu_model, cpu_folded, example.cpu(), repeats=repeats)
    res["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        res["speed"] += speed(model.to(dev), folded.to(dev), example.to(dev), repeats=repeats)
    model.to(device)
    return res, folded.to(device)


def fold_report(loaded, repeats: int = 20) -> tuple[dict, nn.Module]:
    """Fold, parity over the whole test set, and speed on 256 test images."""
    model = loaded.model.eval()
    head = {"checkpoint": str(loaded.path), "model": loaded.model_name,
            "norm": loaded.norm_name}
    return fold_and_time(model, loaded.device, _example(loaded), test_loader(loaded), head,
                         repeats)


def format_fold(res: dict) -> str:
    p = res["parity"]
    lines = [f"checkpoint {res['checkpoint']}  ({res['model']}, norm {res['norm']})",
             f"folded {len(res['folded'])} norm layers into the conv/linear layer before them; "
             f"left {len(res['left'])}"]
    for name, why in res["left"][:10]:
        lines.append(f"  left {name}: {why}")
    if len(res["left"]) > 10:
        lines.append(f"  ... and {len(res['left']) - 10} more")
    lines.append(f"parity on {p['n_images']} test images: max |logit diff| {p['max_abs_diff']:.3g}"
                 f", max |logit| {p['max_abs_logit']:.3g}, relative {p['rel_diff']:.3g} "
                 f"({'ok' if p['ok'] else 'FAILS'} the limit {p['limit']:g})")
    rows = []
    for s in res["speed"]:
        u, f = s["unfolded"], s["folded"]
        rows.append([s["device"], str(s["batch"]), f"{u['median_s'] * 1e3:.2f}",
                     f"{f['median_s'] * 1e3:.2f}", f"{u['images_per_s']:.0f}",
                     f"{f['images_per_s']:.0f}", f"{s['speedup']:.2f}x"])
    lines.append(f"speed (median of {res['speed'][0]['unfolded']['repeats']} calls, "
                 f"{res['torch_threads']} CPU threads; noisy on a shared machine):")
    lines.append(format_table(["device", "batch", "unfolded ms", "folded ms", "unfolded img/s",
                               "folded img/s", "speed-up"], rows))
    if "onnx" in res:
        o = res["onnx"]
        lines.append(f"ONNX {o['path']}: onnxruntime vs PyTorch (folded) on {o['n_images']} "
                     f"test images: max |logit diff| {o['max_abs_diff']:.3g}, relative "
                     f"{o['rel_diff']:.3g} ({'ok' if o['ok'] else 'FAILS'} the limit "
                     f"{o['limit']:g})")
    return "\n".join(lines)


def failure(res: dict) -> str | None:
    """The one line that fails the command: the first parity check over its limit."""
    p = res["parity"]
    if not p["ok"]:
        return (f"fold: the folded model differs from the unfolded one: max |logit diff| "
                f"{p['max_abs_diff']:.3g} is {p['rel_diff']:.3g} of the largest |logit|, over "
                f"the limit {p['limit']:g}")
    o = res.get("onnx")
    if o is not None and not o["ok"]:
        return (f"fold: the ONNX model {o['path']!r} differs from PyTorch: max |logit diff| "
                f"{o['max_abs_diff']:.3g} is {o['rel_diff']:.3g} of the largest |logit|, over "
                f"the limit {o['limit']:g}")
    return None


def fold_result(loaded: Loaded, onnx=None, repeats: int = 20) -> tuple[dict, nn.Module]:
    """Fold, check, time, optionally export to `onnx`: (fold.json's content, the folded model).

    Nothing is printed; `format_fold` is the text and `failure` the line that fails the
    command. A missing ONNX package is refused before any work."""
    if onnx:
        require_onnx()
    res, folded = fold_report(loaded, repeats)
    if onnx:
        path = export_onnx(folded, _example(loaded, 2), onnx)
        res["onnx"] = onnx_parity(path, folded.cpu(), test_loader(loaded))
    return res, folded
