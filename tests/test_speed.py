"""The fast path's pieces: divergence flag, padded evaluation, packed batches, `bnlab bench`."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from bnlab.bench import BenchArgs, run_one
from bnlab.cli import main
from bnlab.config import RunConfig
from bnlab.data.loader import MemoryLoader, Normalizer
from bnlab.data.synthetic import make_synthetic
from bnlab.fast.accel import FirstBad, pad_batch
from bnlab.models import build_model
from bnlab.store import Store
from bnlab.train import train_run
from bnlab.train.evaluate import evaluate
from bnlab.train.pack_model import Member, packed_batches


def test_first_bad_keeps_the_first_non_finite_step_per_run():
    watch = FirstBad(torch.device("cpu"), (3,))
    assert watch.poll(0) is None
    watch.update(torch.tensor([1.0, math.nan, 2.0]), 7)
    watch.update(torch.tensor([1.0, 3.0, math.inf]), 8)
    watch.update(torch.tensor([math.nan, math.nan, math.nan]), 9)
    assert watch.poll(1).tolist() == [9, 7, 8]
    watch.reset()
    assert watch.poll(2, final=True) is None


def test_lazy_first_bad_reports_late_but_never_misses():
    watch = FirstBad(torch.device("cpu"), lazy=True, every=3)
    seen = []
    for i in range(12):
        watch.update(torch.tensor(math.nan if i >= 4 else 1.0), 100 + i)
        bad = watch.poll(i)
        seen.append(None if bad is None else int(bad))
    first = next(i for i, v in enumerate(seen) if v is not None)
    assert seen[first] == 104 and 4 <= first <= 4 + 2 * 3
    watch.reset()
    watch.update(torch.tensor(math.inf), 7)
    assert watch.poll(0) is None and int(watch.poll(1, final=True)) == 7


def test_first_bad_buffers_losses_and_checks_them_when_read():
    """Losses are kept on the device and checked when the flag is read: after a gap in the
    steps, after more steps than the buffer holds, and for float64 losses beyond float32."""
    watch = FirstBad(torch.device("cpu"), (2,), lazy=True, every=4)
    for step in range(10):  # more than `every` updates, never polled
        watch.update(torch.tensor([1.0, math.inf if step >= 6 else 2.0]), step)
    watch.update(torch.tensor([math.nan, 1.0]), 20)  # a gap: steps 10..19 were not recorded
    assert watch.flag.tolist() == [20, 6]
    watch.reset()
    watch.update(torch.tensor([1e300, 5.0], dtype=torch.float64), 0)
    assert watch.flag.tolist() == [-1, -1]
    assert watch.poll(0, final=True) is None


def test_padded_eval_batch_leaves_real_rows_unchanged():
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    x = torch.randn(5, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    padded = pad_batch(x, 12)
    assert padded.shape == (12, 3, 8, 8) and torch.equal(padded[:5], x)
    assert padded.is_contiguous(memory_format=torch.channels_last)
    assert bool((padded[5:] == 0).all())
    with torch.no_grad():
        ref = model(x).double()
        out = model(padded)[:5].double()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_evaluate_with_padding_matches_plain_evaluate():
    bundle = make_synthetic(n_train=16, n_test=22, size=8)
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    loader = MemoryLoader(bundle.test, bundle, 8, torch.device("cpu"), False, False)
    plain = evaluate(model, loader, torch.device("cpu"))
    padded = evaluate(model, loader, torch.device("cpu"), pad_to=8)
    assert padded[1] == plain[1]
    assert abs(padded[0] - plain[0]) < 1e-5


@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("chunk", [1, 2, 32])
def test_packed_batches_are_each_runs_own_batches(augment, chunk, monkeypatch):
    import bnlab.data.loader as L

    monkeypatch.setattr(L, "MAX_CHUNK_BATCHES", chunk)
    bundle = make_synthetic(n_train=40, n_test=8, size=8)
    dev = torch.device("cpu")
    cfgs = [RunConfig(dataset="synthetic", seed=s, batch_size=8) for s in (0, 5, 9)]
    members = [Member(c, None) for c in cfgs]
    norm = Normalizer(bundle.mean * 3, bundle.std * 3, dev)
    packed = list(packed_batches(members, bundle.train, norm, 2, 5, 8, augment, True, dev))
    for k, c in enumerate(cfgs):
        own = MemoryLoader(bundle.train, bundle, 8, dev, True, augment, c.seed)
        for (x, y), (xk, yk) in zip(packed, own.epoch(2), strict=True):
            assert torch.equal(x[:, 3 * k:3 * (k + 1)], xk)
            assert torch.equal(y[:, k], yk)


def test_compile_flag_keeps_run_identity():
    cfg = RunConfig(dataset="synthetic")
    assert dataclasses.replace(cfg, compile=True).run_id() == cfg.run_id()


def test_bench_refuses_bad_options(capsys):
    assert main(["bench", "--variants", "eager,fastest"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fastest" in err and "textbook" in err
    assert main(["bench", "--precision", "fp16"]) == 2
    assert main(["bench", "--k", "0"]) == 2


@pytest.mark.parametrize("flags,named", [
    (["--device", "tpu"], "'tpu'"), (["--model", "resnet21"], "'resnet21'"),
    (["--compile-mode", "fastest"], "'fastest'"),
    (["--data", "imagefolder:{tmp}/nowhere"], "nowhere"), (["--data", "cifar11"], "'cifar11'"),
])
def test_bench_refuses_unknown_names_before_any_variant_runs(flags, named, tmp_path, capsys,
                                                             monkeypatch):
    import bnlab.bench

    def no_variant(*a, **k):
        raise AssertionError("a variant ran")

    monkeypatch.setattr(bnlab.bench, "train_run", no_variant)
    monkeypatch.setattr(bnlab.bench, "train_packed", no_variant)
    argv = ["bench", "--variants", "eager"] + [f.format(tmp=tmp_path) for f in flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and named in err


@pytest.mark.slow
def test_bench_variants_report_positive_speeds():
    args = BenchArgs(steps=2, batch_size=8, k=2, workers=0)
    rows = [run_one(args, v) for v in ("textbook", "eager", "packed")]
    for row in rows:
        json.dumps(row)
        assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 0
    assert rows[2]["model_images_per_s"] == pytest.approx(2 * rows[2]["images_per_s"])


@pytest.mark.slow
def test_compiled_run_matches_eager_run(tmp_path):
    bundle = make_synthetic(n_train=256, n_test=128)
    base = RunConfig(dataset="synthetic", model="mlp3x100", epochs=2, batch_size=32,
                     device="cpu", eval_batch_size=100)
    eager = train_run(base, tmp_path / "e", bundle=bundle, log=lambda s: None)
    fast = train_run(dataclasses.replace(base, compile=True), tmp_path / "c", bundle=bundle,
                     log=lambda s: None)
    assert fast["run_id"] == eager["run_id"]
    assert abs(fast["test_loss"] - eager["test_loss"]) < 1e-3
    rows = Store(tmp_path / "c").run(base.run_id()).metrics()
    assert [r["epoch"] for r in rows] == [1, 2]


MALLOC_PROBE = """
import ctypes, sys
import torch
from bnlab.fast import accel

class Info(ctypes.Structure):  # struct mallinfo2 (glibc >= 2.33)
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
tuned = accel.tune_cpu_allocator() if sys.argv[1] == "tuned" else False
before = libc.mallinfo2().hblkhd
x = torch.empty(2 << 20)  # 8 MiB, a ResNet-20 activation of a CIFAR batch
grew = libc.mallinfo2().hblkhd - before
print(tuned, accel.tune_cpu_allocator() if tuned else tuned, grew)
"""


def test_tuned_allocator_serves_activations_from_the_heap():
    """Without tuning glibc maps an 8 MiB block afresh (and unmaps it when freed); once tuned
    the block comes from the reusable heap. Read from glibc's own accounting (mallinfo2)."""
    import ctypes
    import subprocess
    import sys

    try:
        has = hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        has = False
    if not has:
        pytest.skip("needs glibc >= 2.33")
    out = {}
    for mode in ("plain", "tuned"):
        p = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        out[mode] = p.stdout.split()
    assert int(out["plain"][2]) >= 8 << 20
    assert out["tuned"] == ["True", "True", "0"]


@pytest.mark.slow
def test_compiled_pack_matches_eager_pack(tmp_path):
    """A pack whose parameters are views of the flat optimizer tensor, with a run without BN
    beside one with BN (PartialBatchNorm), compiles, and trains as the eager pack does."""
    from bnlab.train.packed import train_packed

    bundle = make_synthetic(n_train=256, n_test=128)
    base = [RunConfig(dataset="synthetic", model="mlp3x100", epochs=2, batch_size=32,
                      device="cpu", eval_batch_size=100, seed=s, lr=lr, norm=norm)
            for s, lr, norm in ((0, 0.1, "bn"), (1, 0.05, "none"))]
    eager = train_packed(base, tmp_path / "e", bundle=bundle, log=lambda s: None)
    fast = train_packed([dataclasses.replace(c, compile=True) for c in base], tmp_path / "c",
                        bundle=bundle, log=lambda s: None)
    for a, b in zip(eager, fast):
        assert a["run_id"] == b["run_id"] and b["status"] == a["status"] != "failed"
        assert abs(a["test_loss"] - b["test_loss"]) < 1e-3
