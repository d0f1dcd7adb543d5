"""Does the fast path trade accuracy for speed? Test accuracy over seeds, plain vs fast.

    PYTHONPATH=. python benchmarks/fast_vs_plain_accuracy.py \
        --data imagefolder:../shared/data/cifar10-jpg.tar.gz --limit-train 5000 --epochs 5

Trains the same recipe for each seed along these paths:
  plain   fp32, eager, one run at a time, torch's own ops (the reference arithmetic)
  fused   as plain, with bnlab's fused CPU kernels (run option cpu_kernels, the default)
  bf16    bf16 autocast (BN statistics in fp32), fused CPU kernels
  packed  the seeds trained together as one packed network (fp32)
  compiled  torch.compile (with --compile; slow to compile on a CPU)
and prints, per path, the mean and sample standard deviation of the final test accuracy, the
difference to plain, and Welch's t-test p-value. The acceptance rule of docs/speed.md: the mean
of every fast path lies within one standard deviation (of plain) of the plain mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnlab.config import RunConfig, validate  # noqa: E402
from bnlab.data import load_data  # noqa: E402
from bnlab.train import train_run  # noqa: E402
from bnlab.train.packed import train_packed  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--limit-train", type=int, default=5000)
    p.add_argument("--limit-test", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default=None, help="keep the runs here (default: a temp folder)")
    a = p.parse_args()
    base = validate(RunConfig(dataset=a.data, model=a.model, epochs=a.epochs, lr=a.lr,
                              batch_size=a.batch_size, limit_train=a.limit_train,
                              limit_test=a.limit_test, device=a.device, cpu_kernels=False))
    bundle = load_data(base.dataset, None, False, base.limit_train, base.limit_test)
    out = Path(a.out or tempfile.mkdtemp(prefix="bnlab-acc-"))
    seeds = range(a.seeds)
    paths = {
        "plain": lambda c: [train_run(x, out / "plain", True, _quiet, bundle) for x in c],
        "fused": lambda c: [train_run(dataclasses.replace(x, cpu_kernels=True), out / "fused",
                                      True, _quiet, bundle) for x in c],
        "bf16": lambda c: [train_run(dataclasses.replace(x, precision="bf16", cpu_kernels=True),
                                     out / "bf16", True, _quiet, bundle) for x in c],
        "packed": lambda c: train_packed([dataclasses.replace(x, cpu_kernels=True) for x in c],
                                         out / "packed", True, _quiet, bundle),
    }
    if a.compile:
        paths["compiled"] = lambda c: [train_run(dataclasses.replace(x, compile=True),
                                                 out / "compiled", True, _quiet, bundle)
                                       for x in c]
    results = {}
    for name, fn in paths.items():
        t = time.perf_counter()
        summaries = fn([dataclasses.replace(base, seed=s) for s in seeds])
        accs = [s["test_acc"] for s in summaries]
        results[name] = accs
        print(json.dumps({"path": name, "test_acc": accs, "status": [s["status"] for s in
                                                                     summaries],
                          "wall_s": round(time.perf_counter() - t, 1)}), flush=True)
    from scipy import stats

    ref = results["plain"]
    m0, s0 = statistics.mean(ref), statistics.stdev(ref)
    print(f"\n{a.seeds} seeds, {a.model}, {a.epochs} epochs on {bundle.name} "
          f"({len(bundle.train)} train / {len(bundle.test)} test images)")
    ok = True
    for name, accs in results.items():
        m, s = statistics.mean(accs), statistics.stdev(accs)
        line = f"  {name:9s} test acc {m:.4f} +- {s:.4f}"
        if name != "plain":
            p_value = stats.ttest_ind(accs, ref, equal_var=False).pvalue
            within = abs(m - m0) <= s0
            ok &= within
            line += (f"   diff {m - m0:+.4f}  Welch p={p_value:.2f}  "
                     f"{'within' if within else 'OUTSIDE'} one sd of plain")
        print(line)
    return 0 if ok else 1


def _quiet(line: str) -> None:
    pass


if __name__ == "__main__":
    raise SystemExit(main())
