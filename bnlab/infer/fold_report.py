"""`bnlab fold`: fold a checkpoint's BN layers, check parity and speed, optionally export ONNX."""

from __future__ import annotations

import sys

import torch

from bnlab.console import format_table
from bnlab.infer.export import export_onnx, onnx_available, onnx_parity
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


def fold_report(loaded, repeats: int = 20) -> dict:
    """Fold, parity over the whole test set, and speed on the CPU (and CUDA when present)."""
    model = loaded.model.eval()
    folded, info = fold_model(model)
    res = {"checkpoint": str(loaded.path), "model": loaded.model_name, "norm": loaded.norm_name,
           **info, "parity": parity(model, folded, test_loader(loaded)), "speed": []}
    example = _example(loaded)
    cpu_model, cpu_folded = model.cpu(), folded.cpu()
    res["speed"] += speed(cpu_model, cpu_folded, example.cpu(), repeats=repeats)
    res["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        res["speed"] += speed(model.to(dev), folded.to(dev), example.to(dev), repeats=repeats)
        model.to(loaded.device)
    loaded.model = model.to(loaded.device)
    res["_folded"] = folded.to(loaded.device)
    return res


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


def fold_command(loaded: Loaded, onnx=None, repeats=20) -> int:
    """Fold, check, time, optionally export; print the report and write fold.json beside a
    run's checkpoint. Exit status 1 with one line on stderr when a parity check fails."""
    res = fold_report(loaded, repeats)
    folded = res.pop("_folded")
    if onnx:
        if onnx_available() is None:
            path = export_onnx(folded, _example(loaded, 2), onnx)
            res["onnx"] = onnx_parity(path, folded.cpu(), test_loader(loaded))
        else:
            print(format_fold(res))
            export_onnx(folded, _example(loaded, 2), onnx)  # raises the UserError
    print(format_fold(res))
    run = loaded.run_dir
    if run is not None:
        run.write_json("fold.json", res)
        print(f"wrote {run.path / 'fold.json'}")
    why = failure(res)
    if why:
        print(why, file=sys.stderr)
        return 1
    return 0
