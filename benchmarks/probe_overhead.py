"""Cost of the training probes as a fraction of the time of one training step.

Runs the training step of bnlab/train/loop.py (forward, cross-entropy, backward, SGD step) on
fixed random batches and times it in three settings, interleaved round by round so that load
from other processes hits all alike:

    off        no prober (probe_every = 0: no hook exists)
    idle       a prober attached, but not at a probe step (its optimizer hooks only check a
               flag): the cost of probing on the steps between probe steps
    probe      a probe step (activations, norms, ICS, loss landscape)

The amortized overhead at probe_every = N is (idle * (N - 1) + probe) / N / off - 1.

    PYTHONPATH=. python benchmarks/probe_overhead.py --model resnet20 --batch 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bnlab.config import from_mapping
from bnlab.models import build_model
from bnlab.train.probes import make_prober


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--norm", default="bn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15, help="rounds of off/idle steps")
    ap.add_argument("--probe-rounds", type=int, default=3, help="probe steps timed")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    size, ch = (28, 1) if args.model == "mlp3x100" else (32, 3)
    torch.manual_seed(0)
    model = build_model(args.model, 10, norm=args.norm, in_channels=ch, image_size=size).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    x = torch.randn(args.batch, ch, size, size, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(prober, s):
        if prober is not None:
            prober.start(s, 1, x, y)
        out = model(x)
        loss = crit(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    cfg = from_mapping(dict(model=args.model, norm=args.norm, probe_every=1_000_000))
    prober = make_prober(cfg, model, opt, crit)
    times = {"off": [], "idle": [], "probe": []}
    for _ in range(2):  # warm-up
        step(None, 1)
    for r in range(args.rounds):
        modes = ("off", "idle", "probe") if r < args.probe_rounds else ("off", "idle")
        for mode in modes:
            if mode == "off":
                prober.close()
                p = None
            else:
                p = prober = make_prober(cfg, model, opt, crit)
            t0 = time.perf_counter()
            step(p, 0 if mode == "probe" else 1)  # step 0 is a probe step for any N
            times[mode].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + "  ".join(f"{k} {times[k][-1]:.3f} s" for k in modes),
              flush=True)
    prober.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{args.model}/{args.norm}, batch {args.batch}, {args.device}, "
          f"{torch.get_num_threads()} threads, medians of {args.rounds} off/idle and "
          f"{args.probe_rounds} probe steps")
    print(f"step time, probes off:          {med['off']:.3f} s")
    print(f"step time, prober idle:         {med['idle']:.3f} s "
          f"({med['idle'] / med['off'] - 1:+.1%})")
    print(f"step time, probe step:          {med['probe']:.3f} s "
          f"({med['probe'] / med['off']:.1f}x a plain step)")
    for n in (10, 50, 100, 500):
        amort = (med["idle"] * (n - 1) + med["probe"]) / n / med["off"] - 1
        print(f"amortized overhead at probe_every={n}: {amort:+.1%}")


if __name__ == "__main__":
    main()
