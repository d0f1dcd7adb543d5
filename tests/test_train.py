import json
import math

import pytest
import torch

from bnlab.config import RunConfig, validate
from bnlab.store import Store
from bnlab.train import train_run
from bnlab.train.evaluate import chance_threshold
from bnlab.train.optim import lr_factor

DETERMINISTIC = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "step")


def tiny(**kw) -> RunConfig:
    base = dict(dataset="synthetic", model="resnet20", epochs=2, batch_size=32, lr=0.05,
                limit_train=128, limit_test=64, eval_batch_size=64, device="cpu")
    base.update(kw)
    return validate(RunConfig(**base))


def strip(metrics):
    return [{k: m[k] for k in DETERMINISTIC} for m in metrics]


def test_run_writes_folder_and_index(tmp_path):
    cfg = tiny()
    summary = train_run(cfg, tmp_path, log=lambda s: None)
    run = Store(tmp_path).run(cfg.run_id())
    assert summary["status"] in ("completed", "no_learning")
    assert summary["epochs_done"] == 2
    stored = json.loads((run.path / "config.json").read_text())
    assert stored["config"] == cfg.to_dict()
    assert stored["env"]["torch"] == torch.__version__
    assert stored["model"]["parameters"] == 269_722
    assert [m["epoch"] for m in run.metrics()] == [1, 2]
    assert run.checkpoint_path.is_file()
    rows = Store(tmp_path).rows()
    assert rows[0]["run_id"] == cfg.run_id() and rows[0]["epochs_done"] == 2


def test_same_config_and_seed_is_bit_identical_on_cpu(tmp_path):
    cfg = tiny(dropout=0.2)
    a = train_run(cfg, tmp_path / "a", log=lambda s: None)
    b = train_run(cfg, tmp_path / "b", log=lambda s: None)
    ma = Store(tmp_path / "a").run(cfg.run_id()).metrics()
    mb = Store(tmp_path / "b").run(cfg.run_id()).metrics()
    assert strip(ma) == strip(mb)
    assert a["test_acc"] == b["test_acc"]
    other = tiny(dropout=0.2, seed=1)
    train_run(other, tmp_path / "a", log=lambda s: None)
    assert strip(Store(tmp_path / "a").run(other.run_id()).metrics()) != strip(ma)


class Stop(KeyboardInterrupt):
    pass


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    cfg = tiny(epochs=3, dropout=0.1)
    train_run(cfg, tmp_path / "full", log=lambda s: None)

    def crash_after_first_epoch(line):
        if "epoch 1/3" in line:
            raise Stop

    with pytest.raises(Stop):
        train_run(cfg, tmp_path / "cut", log=crash_after_first_epoch)
    run = Store(tmp_path / "cut").run(cfg.run_id())
    assert len(run.metrics()) == 1 and run.summary["status"] == "running"
    with pytest.raises(Exception, match="already exists"):
        train_run(cfg, tmp_path / "cut", log=lambda s: None)
    lines = []
    train_run(cfg, tmp_path / "cut", resume=True, log=lines.append)
    assert any("resuming" in s for s in lines)
    full = Store(tmp_path / "full").run(cfg.run_id())
    assert strip(run.metrics()) == strip(full.metrics())
    state_a = full.load_checkpoint()["model"]
    state_b = run.load_checkpoint()["model"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_huge_lr_diverges_without_crashing(tmp_path):
    cfg = tiny(lr=1e8, epochs=3, norm="none")
    summary = train_run(cfg, tmp_path, log=lambda s: None)
    assert summary["status"] == "diverged"
    assert isinstance(summary["diverged_step"], int) and summary["diverged_step"] >= 0
    assert summary["epochs_done"] < 3
    assert Store(tmp_path).rows()[0]["status"] == "diverged"


def test_no_learning_is_recorded_but_the_run_finishes(tmp_path):
    cfg = tiny(lr=1e-9, epochs=4, momentum=0.0)
    summary = train_run(cfg, tmp_path, log=lambda s: None)
    assert summary["status"] == "no_learning"
    assert summary["epochs_done"] == 4 and summary["at_chance_until_epoch"] == 4


def test_status_describes_the_end_and_a_slow_start_is_a_flag(tmp_path):
    """A run at chance after its first quarter that learns later ends `completed`, with the
    stall kept as a flag; one that falls back to chance at the end is `no_learning`."""
    from bnlab.store import EpochRow
    from bnlab.train.record import RunRecord

    chance = 0.2
    def run(accs):
        rec = RunRecord(Store(tmp_path / str(accs)), tiny(epochs=len(accs)))
        for e, acc in enumerate(accs, 1):
            rec.add_epoch(EpochRow(epoch=e, step=10 * e, lr=0.1, train_loss=1.0,
                                   train_acc=0.5, test_loss=1.0, test_acc=acc, epoch_time=1.0),
                          chance)
        return rec.finish(chance)

    slow = run([0.1, 0.15, 0.6, 0.7])
    assert slow["status"] == "completed" and slow["at_chance_until_epoch"] == 2
    assert slow["test_acc"] == 0.7 and slow["wall_time"] == 4.0
    late = run([0.5, 0.1, 0.1, 0.15])
    assert late["status"] == "no_learning" and "at_chance_until_epoch" not in late
    assert run([0.5, 0.6, 0.7, 0.9])["status"] == "completed"
    assert run([0.1, 0.1, 0.1, 0.2])["status"] == "no_learning"  # at the threshold: chance


def test_learns_above_chance_on_synthetic(tmp_path):
    cfg = tiny(limit_train=256, epochs=3, lr=0.05, batch_size=32)
    summary = train_run(cfg, tmp_path, log=lambda s: None)
    assert summary["train_acc"] > 0.5
    assert summary["test_acc"] > chance_threshold(10, 64)


def test_lr_schedules():
    cfg = tiny(epochs=4, lr=1.0)
    steps = 10  # per epoch, 40 in all: /10 at step 20, /100 at step 30
    assert [lr_factor(cfg, s, steps) for s in (0, 19, 20, 29, 30, 39)] == [
        1, 1, 0.1, 0.1, 0.01, 0.01]
    cos = tiny(epochs=4, schedule="cosine", warmup_epochs=1)
    assert lr_factor(cos, 0, steps) == pytest.approx(0.1)
    assert lr_factor(cos, 9, steps) == pytest.approx(1.0)
    assert lr_factor(cos, 10, steps) == pytest.approx(1.0)
    assert lr_factor(cos, 25, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_skips_norm_and_bias_by_default():
    from bnlab.models import build_model
    from bnlab.train.optim import param_groups

    model = build_model("resnet20", 10)
    groups = param_groups(model, 1e-4, False)
    assert groups[0]["weight_decay"] == 1e-4 and all(p.ndim == 4 or p.ndim == 2
                                                     for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0 and all(p.ndim == 1 for p in groups[1]["params"])
    assert len(param_groups(model, 1e-4, True)) == 1


def test_bf16_precision_runs(tmp_path):
    summary = train_run(tiny(precision="bf16", epochs=1), tmp_path, log=lambda s: None)
    assert summary["epochs_done"] == 1 and math.isfinite(summary["test_loss"])


def test_mlp_on_mnist_format(tmp_path):
    from conftest import write_mnist

    write_mnist(tmp_path / "mnist", n_train=120, n_test=40)
    cfg = tiny(dataset="mnist", data_dir=str(tmp_path / "mnist"), model="mlp3x100",
               limit_train=0, limit_test=0, batch_size=60, epochs=1)
    summary = train_run(cfg, tmp_path / "out", log=lambda s: None)
    assert summary["epochs_done"] == 1


def test_grad_clip_bounds_the_step_to_lr_times_clip(tmp_path):
    """Plain SGD (no momentum, no decay) takes the step -lr * g * min(1, c / |g|): with a tiny
    clip c the parameters move by exactly lr * c in global norm."""
    from bnlab.data import load_data
    from bnlab.models import build_for

    cfg = tiny(epochs=1, limit_train=32, batch_size=32, lr=1.0, momentum=0.0,
               weight_decay=0.0, grad_clip=1e-3)
    torch.manual_seed(cfg.seed)
    start = build_for(cfg, load_data("synthetic", limit_train=32, limit_test=64))
    before = {k: v.clone() for k, v in start.named_parameters()}
    train_run(cfg, tmp_path, log=lambda s: None)
    after = Store(tmp_path).run(cfg.run_id()).load_checkpoint()["model"]
    moved = torch.sqrt(sum(((after[k] - v) ** 2).sum() for k, v in before.items()))
    assert float(moved) == pytest.approx(1e-3, rel=1e-4)


def test_validation_split_is_evaluated_every_epoch_and_kept_out_of_training(tmp_path):
    cfg = tiny(val_fraction=0.25, epochs=2)
    summary = train_run(cfg, tmp_path, log=lambda s: None)
    rows = Store(tmp_path).run(cfg.run_id()).metrics()
    assert [("val_acc" in r and "val_loss" in r) for r in rows] == [True, True]
    assert summary["val_acc"] == rows[-1]["val_acc"]
    config = Store(tmp_path).run(cfg.run_id()).read_json("config.json")
    from bnlab.data import load_data
    held = load_data("synthetic", limit_train=128, val_fraction=0.25).val
    assert config["data"]["n_val"] == len(held) and 28 <= len(held) <= 36
    assert config["data"]["n_train"] + config["data"]["n_val"] == 128
    # the default keeps the run ids of runs made before the option existed
    import dataclasses
    import hashlib
    import json

    from bnlab.config import NOT_IN_ID, OPTIONAL_IN_ID
    # (probe_images, like the probes' step sizes, enters only the ids of probed runs)
    old = {k: v for k, v in tiny().to_dict().items()
           if k not in NOT_IN_ID | OPTIONAL_IN_ID | {"probe_images"}}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:8]
    assert tiny().run_id().endswith(digest)
    assert dataclasses.replace(tiny(), val_fraction=0.1).run_id() != tiny().run_id()


def test_a_failure_after_the_last_epoch_keeps_every_epoch_in_the_summary(tmp_path, monkeypatch):
    """The last epoch's save writes no summary (finish does): a failure in between must report
    the epochs the run did, not the stored summary's one fewer."""
    from bnlab.train.record import RunRecord

    def broken(self, chance=None):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(RunRecord, "finish", broken)
    cfg = tiny(model="mlp3x100", epochs=2)
    with pytest.raises(RuntimeError, match="on fire"):
        train_run(cfg, tmp_path, log=lambda s: None)
    run = Store(tmp_path).run(cfg.run_id())
    rows = run.metrics()
    assert run.summary["status"] == "failed" and run.summary["epochs_done"] == 2 == len(rows)
    assert run.summary["test_acc"] == rows[-1]["test_acc"]
    assert run.summary["error"] == "RuntimeError: disk controller on fire"
