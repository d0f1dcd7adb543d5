"""Helpers shared by several test files: the `bnlab` command run in this process, the packed-
training tests' runs and the SGD steps that compare a packed network with its lone runs, and a
model's norms set as after training."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from bnlab import cli
from bnlab.config import RunConfig
from bnlab.train.optim import PackedSGD, param_groups

ERROR = "bnlab: error: "  # how the command's one-line errors start
QUIET = {"log": lambda s: None}  # a run's log=, for runs whose lines no test reads


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`bnlab ARGV` in this process: (exit code, stdout, stderr) of this command alone (what was
    printed before it is dropped)."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(capsys, argv, *needles, start: str = "") -> str:
    """Run `bnlab ARGV`, which must fail with exit 2 and one line on stderr (no traceback) that
    starts with `start` and holds each of `needles`; returns that line."""
    rc, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(start), (start, lines[0])
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def packed_cfg(**kw) -> RunConfig:
    """A small ResNet-20 run on the synthetic data, as the packed-training tests vary it."""
    return dataclasses.replace(RunConfig(dataset="synthetic", model="resnet20", epochs=2,
                                         batch_size=8, device="cpu", lr=0.05), **kw)


def step_packed_and_lone(packed, models, cfgs, owned, steps: int, batch: int,
                         size: int) -> None:
    """`steps` SGD steps of the packed network (PackedSGD) and of each lone model (torch's SGD
    on its own param groups), on the same float64 batches of `batch` images of `size` px."""
    ndim = {n: p.ndim for m in models for n, p in m.named_parameters()}
    popt = PackedSGD(packed, cfgs, ndim, owned=owned)
    opts = [torch.optim.SGD(param_groups(m, c.weight_decay, c.decay_norm_and_bias), lr=c.lr,
                            momentum=c.momentum) for m, c in zip(models, cfgs)]
    g = torch.Generator().manual_seed(0)
    k = len(cfgs)
    for _ in range(steps):
        xs = [torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64) for _ in cfgs]
        ys = [torch.randint(0, 10, (batch,), generator=g) for _ in cfgs]
        for m, o, x, y in zip(models, opts, xs, ys):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        out = packed(torch.cat(xs, 1)).reshape(batch, k, -1)
        losses = F.cross_entropy(out.permute(0, 2, 1), torch.stack(ys, 1), reduction="none")
        popt.zero_grad()
        losses.mean(0).sum().backward()
        popt.step(torch.tensor([c.lr for c in cfgs], dtype=torch.float64))


def randomize_stats(model, seed=0):
    """Non-trivial running statistics and affine parameters (or buffers, for frozen norms) in
    every norm that keeps running statistics, as after training; the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(getattr(m, "running_mean", None), torch.Tensor):
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            if getattr(m, "weight", None) is not None:
                m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def write_study_meta(store, entries: list[dict], name: str = "div") -> None:
    """The study.json of a hand-made two-arm study (norm x seed, BN the baseline) whose run
    folders the test wrote itself."""
    store.write_meta("study.json", {"name": name, "description": "", "spec": {},
                                    "sets": {}, "only": {}, "data_map": {},
                                    "axes": ["norm", "seed"], "runs": entries,
                                    "analysis": {"baseline": {"norm": "bn"}}})
