"""Run by tests/test_distributed.py under torchrun with 2 CPU processes (gloo): trains through
the real `train_run` and records what each process saw. Not collected by pytest (no test_ prefix).

usage: python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

import bnlab.train.loop as train_mod
from bnlab.data.loader import make_loader
from bnlab.data.synthetic import make_synthetic
from bnlab.models import build_model
from bnlab.train.distributed import Context, detect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_common import BN_CFG, GHOST_CFG, GROUP_CFG, SHARD_BATCH, bundle_for  # noqa: E402


def shard_statistics(out: Path, ctx: Context) -> None:
    """One training-mode forward through DDP on this process's shard of a global batch."""
    bundle = make_synthetic(n_train=64, n_test=16, size=16)
    torch.manual_seed(0)
    model = build_model("resnet20", bundle.num_classes, norm="bn", image_size=16)
    net = ctx.wrap(model, sync_bn=False)
    loader = ctx.train_loader(make_loader(bundle, True, SHARD_BATCH, ctx.device, True, 0, 0),
                              bundle, SHARD_BATCH, 0, 0, torch.contiguous_format)
    x, y = next(iter(loader.epoch(1)))
    seen = {}
    model.n1.register_forward_hook(lambda mod, inp, outp: seen.setdefault("n1", outp.detach()))
    net(x)
    own = {"running_mean": model.n1.running_mean.clone(),
           "running_var": model.n1.running_var.clone()}
    ctx.average_buffers(model)
    torch.save({"x": x, "y": y, "n1_out": seen["n1"], "own": own,
                "averaged": {"running_mean": model.n1.running_mean.clone(),
                             "running_var": model.n1.running_var.clone()}},
               out / f"shard{ctx.env.rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    env = detect()
    tdist.init_process_group("gloo")
    ctx = Context(env, torch.device("cpu"))
    shard_statistics(out, ctx)

    # group norm (per sample) and ghost norm (per virtual batch): must match the single-process
    # runs that the test trains itself
    for cfg in (GROUP_CFG, GHOST_CFG):
        train_mod.train_run(cfg, out / cfg.norm, bundle=bundle_for(cfg))

    # resume: an uninterrupted run, and one that crashes in epoch 2's evaluation on every
    # process and is then resumed from its epoch-1 checkpoint
    train_mod.train_run(BN_CFG, out / "ref", bundle=bundle_for(BN_CFG))
    real, calls = train_mod.evaluate_topk, []

    def crash_in_epoch_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected crash")
        return real(*a, **kw)

    train_mod.evaluate_topk = crash_in_epoch_2
    try:
        train_mod.train_run(BN_CFG, out / "resumed", bundle=bundle_for(BN_CFG))
    except RuntimeError as e:
        assert "injected crash" in str(e)
    finally:
        train_mod.evaluate_topk = real
    if env.is_main:
        run = out / "resumed" / BN_CFG.run_id()
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        (out / "interrupted.json").write_text(json.dumps(
            {"status": json.loads((run / "summary.json").read_text())["status"],
             "checkpoint_epoch": state["epoch"]}))
    train_mod.train_run(BN_CFG, out / "resumed", resume=True, bundle=bundle_for(BN_CFG))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
