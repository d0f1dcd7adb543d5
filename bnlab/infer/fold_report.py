"""`bnlab fold`: fold a checkpoint's BN layers, check parity and speed, optionally export ONNX."""

from __future__ import annotations

import torch

from bnlab.console import format_table
from bnlab.infer.export import export_onnx, onnx_available, onnx_parity
from bnlab.infer.fold import fold_model, parity, speed
from bnlab.infer.loading import load_model, test_loader


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
    res = {"checkpoint": str(loaded.path), "model": loaded.cfg.model, "norm": loaded.cfg.norm,
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
                     f"{o['rel_diff']:.3g}")
    return "\n".join(lines)


def fold_command(checkpoint, onnx=None, data_dir=None, device="cpu", repeats=20) -> int:
    loaded = load_model(checkpoint, data_dir, device)
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
    return 0 if res["parity"]["ok"] else 1
