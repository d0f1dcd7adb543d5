"""Images/s of the textbook loop and of bnlab's variants, repeated; prints medians and ratios.

    PYTHONPATH=. python benchmarks/textbook_vs_bnlab.py \
        --data imagefolder:../shared/data/cifar10-jpg.tar.gz --repeats 3 --steps 20

Each repeat is one `bnlab bench` pass (the textbook loop first, then every bnlab variant, each
in its own process), so every ratio compares measurements taken minutes apart on the same
machine; the median over repeats damps the noise of a shared machine. `--epoch` times whole
epochs of the training set instead of `--steps` steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnlab.bench import BenchArgs, run_all  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--variants", default="textbook,eager,compiled,packed")
    p.add_argument("--precision", default="fp32,bf16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--epoch", action="store_true", help="time whole epochs (50k images: slow)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="bnlab's fused CPU kernels (run option cpu_kernels)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", default=None, help="JSON lines of every measurement")
    a = p.parse_args()
    steps = a.steps
    if a.epoch:
        from bnlab.data import load_data

        steps = len(load_data(a.data).train) // a.batch_size if a.data != "synthetic" else 390
    args = BenchArgs(data=a.data, batch_size=a.batch_size, steps=steps, k=a.k,
                     workers=a.workers, device=a.device, cpu_kernels=a.cpu_kernels)
    rows = []
    for r in range(a.repeats):
        print(f"-- repeat {r + 1}/{a.repeats}", flush=True)
        rows += [dict(row, repeat=r) for row in run_all(
            args, a.variants.split(","), a.precision.split(","), a.timeout,
            lambda line: print(line, flush=True))]
        if a.out:
            Path(a.out).write_text("".join(json.dumps(x) + "\n" for x in rows))
    print(f"\nmedians over {a.repeats} repeats ({args.batch_size} images/step, {steps} timed "
          f"steps, data {a.data}):")
    keys = sorted({(x["variant"], x.get("precision", "?")) for x in rows},
                  key=lambda vp: (vp[0] != "textbook", vp[1], vp[0]))
    for variant, precision in keys:
        mine = [x for x in rows if x["variant"] == variant and x.get("precision") == precision
                and "error" not in x]
        if not mine:
            print(f"  {variant:16s} {precision}  failed")
            continue
        ips = statistics.median(x["model_images_per_s"] for x in mine)
        ratios = [x["ratio_vs_textbook"] for x in mine if x.get("ratio_vs_textbook")]
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        spread = ", ".join(f"{x['model_images_per_s']:.0f}" for x in mine)
        print(f"  {variant:16s} {precision}  K={mine[0]['k']}  {ips:8.0f} model-img/s  "
              f"(runs: {spread})  ratio vs textbook {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
