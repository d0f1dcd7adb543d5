"""TensorBoard event files of runs and studies, read back with tensorboard's own reader and
checked against metrics.jsonl and probes.jsonl."""

from __future__ import annotations

import dataclasses
import math
import textwrap

import pytest

from bnlab import cli
from bnlab.config import from_mapping
from bnlab.store import Store
from bnlab.train import train_run
from bnlab.train.board import event_dir, run_name, summary_writer

pytest.importorskip("tensorboard")  # the tensorboard extra (part of [test])
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

SPEC = """
name = "tiny-board"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 64
limit_test = 64
batch_size = 16
epochs = 2
lr = 0.05
device = "cpu"
probe_every = 2
[grid]
norm = ["bn", "none"]
seed = [0]
"""
BASE = dict(dataset="synthetic", model="mlp3x100", limit_train=64, limit_test=32, batch_size=16,
            epochs=3, lr=0.05, device="cpu", tensorboard=True)


def scalars(folder, tag) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _run_with_tensorboard(tmp_path, spec: str):
    """`bnlab study run SPEC --tensorboard` into tmp_path/out; returns the output folder."""
    path = tmp_path / "spec.toml"
    path.write_text(textwrap.dedent(spec))
    out = tmp_path / "out"
    assert cli.main(["study", "run", str(path), "--out", str(out), "--tensorboard"]) == 0
    return out


def test_study_flag_names_runs_by_arm_and_seed(tmp_path):
    out = _run_with_tensorboard(tmp_path, SPEC)
    store = Store(out)
    runs = {json_run["values"]["norm"]: json_run["run_id"]
            for json_run in store.read_meta("study.json")["runs"]}
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["norm=bn", "norm=none"]
    for norm, run_id in runs.items():
        board = out / "tensorboard" / f"norm={norm}" / "seed0"
        metrics = store.run(run_id).metrics()
        got = scalars(board, "metrics/test_acc")
        assert got == [(m["epoch"], pytest.approx(m["test_acc"], rel=1e-6)) for m in metrics]
        acc = EventAccumulator(str(board / "probes"), size_guidance={"histograms": 0})
        acc.Reload()
        probes = store.run(run_id).read_rows("probes.jsonl")
        loss_var = [(r["step"], r["value"]) for r in probes if r["metric"] == "loss_variation_abs"]
        assert [(s, pytest.approx(v, rel=1e-6)) for s, v in loss_var] == \
            scalars(board / "probes", "loss_variation_abs/model")
        assert "act/hidden.0.sigmoid" in acc.Tags()["histograms"]
        assert store.run(run_id).config["tensorboard"] is True


def test_a_lone_run_is_named_by_its_id_and_a_resume_purges_a_killed_attempt(tmp_path):
    cfg = from_mapping(BASE)
    assert run_name(tmp_path, cfg) == cfg.run_id()

    def stop_after_epoch_1(msg):  # logged once epoch 1 is stored
        if "epoch 1/3" in msg:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path, log=stop_after_epoch_1)
    # what a killed attempt leaves when it dies between its event and its checkpoint
    stale = summary_writer(event_dir(tmp_path, cfg))
    stale.add_scalar("metrics/test_acc", 99.0, 2)
    stale.close()
    # opened in the same second as the stale file: its name must still sort after it
    train_run(cfg, tmp_path, resume=True, log=lambda m: None)
    metrics = Store(tmp_path).run(cfg.run_id()).metrics()
    assert scalars(event_dir(tmp_path, cfg), "metrics/test_acc") == \
        [(m["epoch"], pytest.approx(m["test_acc"], rel=1e-6)) for m in metrics]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]


def test_writers_opened_one_after_another_sort_in_that_order(tmp_path):
    """TensorBoard reads event files in name order, and a purge hides only what files read
    before it wrote: each of writers opened at once in one folder sorts after the ones before,
    and the last one's purge hides their steps from 1 on."""
    files = []
    for attempt in range(3):
        w = summary_writer(tmp_path, purge_step=1)
        for step in range(0 if attempt == 0 else 1, 3):  # a resume from step 1
            w.add_scalar("x", float(attempt), step)
        w.close()
        (new,) = set(tmp_path.glob("events.*")) - set(files)
        files.append(new)
    assert sorted(files) == files
    assert scalars(tmp_path, "x") == [(0, 0.0), (1, 2.0), (2, 2.0)]


def test_tensorboard_no_longer_needs_probes_and_is_not_in_the_run_id():
    cfg = from_mapping(dict(BASE, tensorboard=True))
    assert cfg.probe_every == 0
    assert cfg.run_id() == dataclasses.replace(cfg, tensorboard=False).run_id()


def test_a_run_starting_from_scratch_hides_what_a_killed_attempt_wrote(tmp_path):
    """An attempt killed during epoch 1 leaves probe events (and, killed between its event and
    its checkpoint, an epoch scalar) but no checkpoint: the run starts again at step 0 and
    each step shows once, with this attempt's value."""
    cfg = from_mapping(dict(BASE, epochs=2, probe_every=2))
    folder = event_dir(tmp_path, cfg)
    stale = summary_writer(folder)
    stale.add_scalar("metrics/test_acc", 99.0, 1)
    stale.close()
    stale = summary_writer(folder / "probes")
    for step in (0, 2):
        stale.add_scalar("loss_variation_abs/model", 99.0, step)
    stale.close()
    # TensorBoard reads a folder's event files in name order, and names written in the same
    # second by one process can sort either way (a counter as text: "9" > "10"): named as
    # the earlier files they stand for
    for f in [*folder.glob("events.*"), *(folder / "probes").glob("events.*")]:
        f.rename(f.with_name("events.out.tfevents.0000000001.killed"))
    train_run(cfg, tmp_path, log=lambda m: None)
    run = Store(tmp_path).run(cfg.run_id())
    assert scalars(folder, "metrics/test_acc") == \
        [(m["epoch"], pytest.approx(m["test_acc"], rel=1e-6)) for m in run.metrics()]
    probes = [(r["step"], pytest.approx(r["value"], rel=1e-6))
              for r in run.read_rows("probes.jsonl") if r["metric"] == "loss_variation_abs"]
    assert [step for step, _ in probes][:2] == [0, 2]  # the stale steps are real steps too
    assert scalars(folder / "probes", "loss_variation_abs/model") == probes


def hparams_data(folder) -> dict:
    """The HParams plugin's records of an event folder: {"start": SessionStartInfo, "end": ...}."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    out = {}
    for tag, kind in ((metadata.SESSION_START_INFO_TAG, "start"),
                      (metadata.SESSION_END_INFO_TAG, "end")):
        if tag in content:
            data = plugin_data_pb2.HParamsPluginData.FromString(content[tag])
            out[kind] = getattr(data, f"session_{kind}_info")
    return out


def start_values(start) -> dict:
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
            for k, v in start.hparams.items()}


SEEDS_SPEC = SPEC.replace("seed = [0]", "seed = [0, 1]").replace("epochs = 2", "epochs = 1")


def test_hparams_group_the_seeds_of_each_arm_and_units_match_across_seeds(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    out = _run_with_tensorboard(tmp_path, SEEDS_SPEC)
    store = Store(out)
    unit_tags = {}
    for r in store.read_meta("study.json")["runs"]:
        norm, seed = r["values"]["norm"], r["values"]["seed"]
        board = out / "tensorboard" / f"norm={norm}" / f"seed{seed}"
        hp = hparams_data(board)
        # what tells the arm apart, one session group per arm (its seeds together)
        assert start_values(hp["start"]) == {"norm": norm}
        assert hp["start"].group_name == f"norm={norm}"
        run = store.run(r["run_id"])
        assert run.summary["status"] in ("completed", "no_learning")
        assert hp["end"].status == api_pb2.STATUS_SUCCESS
        # the step losses of the first epoch: one per step, averaging to its train_loss
        # (equal batches of 16: the sample-weighted mean of metrics.jsonl is the plain one)
        steps = scalars(board / "steps", "first_epoch/train_loss")
        assert [s for s, _ in steps] == [0, 1, 2, 3]
        first = run.metrics()[0]
        assert sum(v for _, v in steps) / 4 == pytest.approx(first["train_loss"], rel=1e-5)
        acc = EventAccumulator(str(board / "probes"), size_guidance={"scalars": 0})
        acc.Reload()
        unit_tags[(norm, seed)] = {t for t in acc.Tags()["scalars"] if "[" in t}
        rows = {(row["layer"], row["unit"]) for row in run.read_rows("probes.jsonl")
                if "unit" in row}
        assert {f"unit_p50/{layer}[{u}]" for layer, u in rows} == \
            {t for t in unit_tags[(norm, seed)] if t.startswith("unit_p50/")}
    # the same unit indices in every seed and arm, so the curves of one tag overlay
    tags = list(unit_tags.values())
    assert tags[0] and all(t == tags[0] for t in tags)


def test_a_lone_run_has_its_options_as_hparams_and_a_divergence_shows_on_the_step_curve(
        tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    cfg = from_mapping(dict(BASE, epochs=1, norm="none", lr=1e20, cpu_kernels=False))
    summary = train_run(cfg, tmp_path, log=lambda m: None)
    assert summary["status"] == "diverged"
    bad = summary["diverged_step"]
    folder = event_dir(tmp_path, cfg)
    hp = hparams_data(folder)
    assert start_values(hp["start"]) == {
        "model": "mlp3x100", "norm": "none", "dataset": "synthetic", "seed": 0.0, "lr": 1e20,
        "limit_train": 64.0, "limit_test": 32.0, "batch_size": 16.0, "epochs": 1.0}
    assert hp["start"].group_name == "" and hp["end"].status == api_pb2.STATUS_FAILURE
    steps = scalars(folder / "steps", "first_epoch/train_loss")
    values = dict(steps)
    assert all(math.isfinite(values[s]) for s in range(bad))
    assert bad > 0 and not math.isfinite(values[bad])  # the curve shows where it diverged
