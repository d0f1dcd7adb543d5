"""Data-parallel training on the CPU: 2 gloo processes under torchrun against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ddp_common import BN_AS_GHOST_CFG, BN_CFG, GHOST_CFG, GROUP_CFG, SHARD_BATCH, bundle_for

import bnlab.train.loop as train_mod
from bnlab.data.loader import make_loader
from bnlab.data.synthetic import make_synthetic
from bnlab.errors import UserError
from bnlab.models import build_model
from bnlab.train.distributed import DistEnv, detect, launch_command

ROOT = Path(__file__).resolve().parent.parent
# float32 sums in another order (two half-batch means averaged by DDP vs one mean) over 6 SGD
# steps: observed differences are ~1e-7; anything above 1e-4 would be a real mismatch
TOL = 1e-4


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "ddp_worker.py"), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _single(cfg, out: Path) -> Path:
    train_mod.train_run(cfg, out, bundle=bundle_for(cfg), log=lambda _m: None)
    return out / cfg.run_id()


def _assert_same_run(single: Path, ddp: Path) -> float:
    """Metrics and every weight and buffer equal to TOL; returns the largest difference."""
    for a, b in zip(_rows(single), _rows(ddp), strict=True):
        for key in ("train_loss", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=TOL, abs=TOL), key
        for key in ("train_acc", "test_acc", "test_acc5"):
            assert a[key] == pytest.approx(b[key], abs=1e-9), key
    wa, wb = _weights(single), _weights(ddp)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k].double(), wa[k].double(), rtol=TOL, atol=TOL, msg=k)
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


@pytest.mark.parametrize("cfg", [GROUP_CFG, GHOST_CFG], ids=["group", "ghost"])
def test_ddp_matches_single_process(cfg, ddp_out, tmp_path, one_thread):
    worst = _assert_same_run(_single(cfg, tmp_path), ddp_out / cfg.norm / cfg.run_id())
    print(f"{cfg.norm}: largest weight/buffer difference, 2 processes vs 1: {worst:.2e}")
    d = json.loads((ddp_out / cfg.norm / cfg.run_id() / "config.json").read_text())
    assert d["distributed"] == {"world_size": 2, "backend": "gloo", "global_batch": 16,
                                "per_device_batch": 8, "sync_bn": False, "norm_batch": 8}


def test_bn_on_two_processes_is_ghost_bn_on_one(ddp_out, tmp_path, one_thread):
    """BN's per-device batch of 8, running statistics included, is ghost BN with v = 8."""
    worst = _assert_same_run(_single(BN_AS_GHOST_CFG, tmp_path),
                             ddp_out / "ref" / BN_CFG.run_id())
    print(f"bn on 2 processes vs ghost(8) on 1: largest difference {worst:.2e}")


def test_bn_statistics_come_from_each_shard(ddp_out):
    bundle = make_synthetic(n_train=64, n_test=16, size=16)
    loader = make_loader(bundle, True, SHARD_BATCH, torch.device("cpu"), True, 0, 0)
    x_global, y_global = next(iter(loader.epoch(1)))
    torch.manual_seed(0)
    conv1 = build_model("resnet20", bundle.num_classes, norm="bn", image_size=16).conv1.double()
    shards = [torch.load(ddp_out / f"shard{r}.pt", weights_only=True) for r in (0, 1)]
    # the two shards are the halves of the single-process global batch, in order
    torch.testing.assert_close(torch.cat([s["x"] for s in shards]), x_global)
    assert torch.equal(torch.cat([s["y"] for s in shards]), y_global)
    with torch.no_grad():
        full = conv1(x_global.double())
        hs = [conv1(s["x"].double()) for s in shards]
    for s, h in zip(shards, hs):
        # the forward normalized with this shard's mean and biased variance (gamma 1, beta 0)
        ref = (h - h.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            h.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(s["n1_out"].double(), ref, rtol=1e-4, atol=1e-4)
        # from running_mean = 0, var = 1: one momentum-0.1 update with this shard's statistics
        mean, var = 0.1 * h.mean((0, 2, 3)), 0.9 + 0.1 * h.var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(s["own"]["running_mean"].double(), mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s["own"]["running_var"].double(), var, rtol=1e-4, atol=1e-6)
        # ... not the statistics of the whole global batch
        assert (s["own"]["running_mean"].double() - 0.1 * full.mean((0, 2, 3))).abs().max() > 1e-3
    # after the step every process holds the mean of the two shard updates
    mean = 0.1 * sum(h.mean((0, 2, 3)) for h in hs) / 2
    var = 0.9 + 0.1 * sum(h.var((0, 2, 3), unbiased=True) for h in hs) / 2
    for s in shards:
        torch.testing.assert_close(s["averaged"]["running_mean"].double(), mean, rtol=1e-4,
                                   atol=1e-6)
        torch.testing.assert_close(s["averaged"]["running_var"].double(), var, rtol=1e-4,
                                   atol=1e-6)


def test_ddp_resume_matches_uninterrupted(ddp_out):
    rid = BN_CFG.run_id()
    interrupted = json.loads((ddp_out / "interrupted.json").read_text())
    assert interrupted == {"status": "failed", "checkpoint_epoch": 1}
    ref, resumed = ddp_out / "ref" / rid, ddp_out / "resumed" / rid
    assert json.loads((resumed / "summary.json").read_text())["status"] in (
        "completed", "no_learning")
    ra, rb = _rows(ref), _rows(resumed)
    assert [r["epoch"] for r in rb] == [1, 2]
    for a, b in zip(ra, rb, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "test_acc5"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    wa, wb = _weights(ref), _weights(resumed)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-6, atol=1e-7, msg=k)


def test_only_rank_zero_wrote(ddp_out):
    # one run folder per configuration, no stray files from rank 1
    assert sorted(p.name for p in (ddp_out / "ref").iterdir() if p.is_dir()) == [
        BN_CFG.run_id()]


def test_detect_reads_torchrun_environment():
    assert detect({}) == DistEnv()
    assert not detect({}).enabled
    e = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (e.rank, e.world_size, e.local_rank, e.enabled, e.is_main) == (3, 4, 1, True, False)
    with pytest.raises(UserError, match="WORLD_SIZE"):
        detect({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UserError, match="integers"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})


def test_launch_command_runs_bnlab_train_under_torchrun():
    cmd = launch_command(2, ["--epochs", "1"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                       "-m", "bnlab", "train", "--epochs", "1"]


def test_sync_bn_on_cpu_is_one_line_error(tmp_path, capsys):
    from bnlab.cli import main

    argv = ["train", "--dataset", "synthetic", "--device", "cpu", "--sync-bn", "--out",
            str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sync_bn needs CUDA" in err
    assert not any(tmp_path.glob("*/config.json"))  # nothing half-written


def test_sync_bn_on_cpu_is_refused_before_launching():
    from bnlab.cli import main

    assert main(["train", "--nproc", "2", "--device", "cpu", "--sync-bn"]) == 2


def test_peak_lr_linear_scaling():
    cfg = BN_CFG.__class__(lr=0.1, batch_size=1024, lr_scaling="linear")
    assert train_mod.peak_lr(cfg) == pytest.approx(0.4)
    assert train_mod.peak_lr(BN_CFG) == BN_CFG.lr


def test_top5_counts_label_among_five_largest_logits():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    logits = torch.tensor([[9., 8, 7, 6, 5, 4, 0], [0., 1, 2, 3, 4, 5, 6], [1., 0, 0, 0, 0, 0, 0]])
    y = torch.tensor([4, 0, 0])

    class Loader:
        def epoch(self, e):
            yield logits, y

    m = train_mod.evaluate_topk(Fixed(), Loader(), torch.device("cpu"))
    # row 0: label 4 is 5th largest (top-5 hit, top-1 miss); row 1: label 0 is smallest; row 2 hit
    assert m["acc"] == pytest.approx(1 / 3) and m["acc5"] == pytest.approx(2 / 3)
    assert m["loss"] == pytest.approx(F.cross_entropy(logits, y).item())


@pytest.mark.slow
def test_nproc_shortcut_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bnlab", "train", "--nproc", "2", "--device", "cpu",
                        "--dataset", "synthetic", "--limit-train", "64", "--limit-test", "32",
                        "--batch-size", "16", "--epochs", "1", "--workers", "0",
                        "--out", str(tmp_path)],
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # rank 0 alone prints: one epoch line and one final line
    assert r.stdout.count("epoch 1/1") == 1 and r.stdout.count("test acc") == 1, r.stdout
    (cfg,) = tmp_path.glob("*/config.json")
    assert json.loads(cfg.read_text())["distributed"]["world_size"] == 2
