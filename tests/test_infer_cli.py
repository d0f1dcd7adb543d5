"""`bnlab compare`, `diagnose` and `fold` end to end on tiny runs, and their bad-input errors."""

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from helpers import one_line_error

from bnlab.cli import main
from bnlab.config import from_mapping
from bnlab.infer import loading
from bnlab.infer.predictions import CACHE_FILE, run_predictions
from bnlab.store import Store
from bnlab.train import train_run

CONTRACT_RUN_KEYS = {"run_id", "arm", "seed", "test_acc", "nll", "brier", "ece",
                     "per_class_acc", "corruption_acc", "adabn_acc", "adabn_clean_acc"}
CONTRACT_PAIR_KEYS = {"a", "b", "arm_a", "arm_b", "agreement", "right_to_wrong",
                      "wrong_to_right", "both_right", "both_wrong", "kl_ab", "kl_ba", "js"}
CONTRACT_ROW_KEYS = {"kind", "arm_a", "arm_b", "pairs", "runs_a", "runs_b", "agreement",
                     "flips", "right_to_wrong", "wrong_to_right", "kl_ab", "kl_ba", "js"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    base = dict(dataset="synthetic", model="mlp3x100", limit_train=128, limit_test=96,
                batch_size=32, epochs=1, lr=0.05, device="cpu")
    return from_mapping({**base, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs")
    paths = {}
    for norm in ("bn", "none"):
        for seed in (0, 1):
            cfg = _cfg(norm=norm, seed=seed)
            train_run(cfg, out, log=lambda m: None)
            paths[norm + ("1" if seed else "")] = out / cfg.run_id()
    yield out, paths
    torch.set_num_threads(threads)


def _predictions(path):
    """Predicted classes and labels of a run, by a second path (the model's own forward)."""
    ld = loading.load_model(path)
    with torch.no_grad():
        xs, ys = zip(*loading.test_loader(ld).epoch(0))
        return ld.model(torch.cat(xs)).argmax(1).numpy(), torch.cat(ys).numpy()


def _spread(values):
    return pytest.approx(np.mean(values), abs=1e-12), pytest.approx(np.std(values, ddof=1),
                                                                    abs=1e-12)


def test_compare_over_seeds_writes_contract_json_and_figures(runs, tmp_path, capsys):
    out, paths = runs
    dest = tmp_path / "analysis"
    order = ["bn", "none1", "none", "bn1"]  # arms are found by label, seeds sorted
    assert main(["compare", *(str(paths[k]) for k in order), "--out", str(dest)]) == 0
    text = capsys.readouterr().out
    assert "norm=bn" in text and "norm=none" in text and "gaussian_noise" in text
    assert "within" in text and "between" in text and "no batch statistics to adapt" in text
    res = json.loads((dest / "compare.json").read_text())
    assert res["format"] == 2 and res["n_test"] == 96
    assert res["figures"] == ["reliability.png", "confidence.png", "corruptions.png"]
    for f in res["figures"]:
        assert (dest / f).read_bytes()[:4] == b"\x89PNG"
    summaries = {p.name: Store(out).run(p.name).summary for p in paths.values()}
    assert [(r["arm"], r["seed"]) for r in res["runs"]] == [
        ("norm=bn", 0), ("norm=bn", 1), ("norm=none", 0), ("norm=none", 1)]
    for r in res["runs"]:
        assert CONTRACT_RUN_KEYS <= set(r)
        # the same number the training loop measured, by a second path
        assert r["test_acc"] == pytest.approx(summaries[r["run_id"]]["test_acc"], abs=1e-12)
        assert set(r["corruption_acc"]) == {"gaussian_noise", "gaussian_blur", "contrast",
                                            "brightness"}
        assert all(len(v) == 5 for v in r["corruption_acc"].values())
        adapts = r["arm"] == "norm=bn"
        assert (r["adabn_acc"] is not None) == adapts and r["batch_stat_layers"] == 3 * adapts
    bn, none = res["arms"]
    assert (bn["label"], bn["n"], bn["adapts"], none["adapts"]) == ("norm=bn", 2, True, False)
    accs = [summaries[paths[k].name]["test_acc"] for k in ("bn", "bn1")]
    assert (bn["test_acc"]["mean"], bn["test_acc"]["sd"]) == _spread(accs)
    eces = [r["ece"] for r in res["runs"][:2]]
    assert (bn["ece"]["mean"], bn["ece"]["sd"]) == _spread(eces)
    assert none["adabn_acc"] is None and bn["adabn_acc"]["mean"]["n"] == 2

    assert len(res["pairs"]) == 6
    for p in res["pairs"]:
        assert CONTRACT_PAIR_KEYS <= set(p)
        assert p["both_right"] + p["both_wrong"] + p["right_to_wrong"] + \
            p["wrong_to_right"] == 96
    pred = {k: _predictions(paths[k]) for k in ("bn", "bn1", "none", "none1")}
    between, within_bn, within_none = res["agreement"]
    for row in res["agreement"]:
        assert CONTRACT_ROW_KEYS <= set(row)
    assert (between["kind"], between["pairs"], between["arm_a"]) == ("between", 4, "norm=bn")
    agree = [float((pred[a][0] == pred[b][0]).mean()) for a in ("bn", "bn1")
             for b in ("none", "none1")]
    assert (between["agreement"]["mean"], between["agreement"]["sd"]) == _spread(agree)
    y = pred["bn"][1]
    r2w = [float(((pred[a][0] == y) & (pred[b][0] != y)).mean()) for a in ("bn", "bn1")
           for b in ("none", "none1")]
    assert between["right_to_wrong"]["mean"] == pytest.approx(np.mean(r2w), abs=1e-12)
    assert (within_bn["kind"], within_bn["pairs"]) == ("within", 1)
    assert within_bn["agreement"]["mean"] == pytest.approx(
        float((pred["bn"][0] == pred["bn1"][0]).mean()), abs=1e-12)
    assert within_bn["agreement"]["sd"] is None  # one pair
    one_right = float(((pred["none"][0] == y) != (pred["none1"][0] == y)).mean())
    assert within_none["flips"]["mean"] == pytest.approx(one_right, abs=1e-12)
    assert within_none["right_to_wrong"]["mean"] == pytest.approx(one_right / 2, abs=1e-12)


def test_predictions_are_cached_per_run_and_match_a_fresh_pass(runs, tmp_path):
    out, paths = runs
    run = tmp_path / paths["bn"].name
    shutil.copytree(paths["bn"], run, ignore=shutil.ignore_patterns(CACHE_FILE))
    ld = loading.load_model(run)
    before = {k: v.clone() for k, v in ld.model.state_dict().items()}
    fresh = run_predictions(ld, log=lambda m: None)
    for k, v in ld.model.state_dict().items():  # AdaBN never touches the model itself
        assert torch.equal(v, before[k]), k
    cache = run / CACHE_FILE
    stamp = cache.stat().st_mtime_ns
    again = run_predictions(loading.load_model(run), log=lambda m: None)
    assert cache.stat().st_mtime_ns == stamp  # read, not recomputed
    assert torch.equal(again["logits"], fresh["logits"])
    assert again["adabn_acc"] == fresh["adabn_acc"]
    # another checkpoint in the same folder: the cached entry no longer applies
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    for k, v in state["model"].items():
        if k.endswith("running_mean"):
            v.add_(1.0)
    torch.save(state, run / "checkpoint.pt")
    changed = run_predictions(loading.load_model(run), corruptions=False, log=lambda m: None)
    assert not torch.equal(changed["logits"], fresh["logits"])
    assert changed["corruption_acc"] is None


def test_a_conv_model_predicts_in_its_training_layout(tmp_path):
    """A ResNet is loaded channels_last, as it trained; its logits are those of a float64 copy
    of the same weights on NCHW images (a second computation in another layout)."""
    cfg = _cfg(model="resnet20", limit_train=64, limit_test=40, batch_size=16)
    train_run(cfg, tmp_path, log=lambda m: None)
    ld = loading.load_model(tmp_path / cfg.run_id())
    conv = next(p for p in ld.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    logits, labels = loading.predict(ld.model, loading.test_loader(ld, batch_size=16))
    ref = copy.deepcopy(ld.model).to(torch.float64, memory_format=torch.contiguous_format)
    with torch.no_grad():
        xs, ys = zip(*loading.test_loader(ld, batch_size=16).epoch(0))
        expected = ref(torch.cat(xs).to(torch.float64).contiguous())
    assert torch.equal(labels, torch.cat(ys)) and len(labels) == 40
    assert torch.allclose(logits.double(), expected, rtol=1e-4, atol=1e-4)


def test_a_bf16_run_is_predicted_in_bf16(tmp_path):
    """Predictions run in the run's own precision: a bf16 run's logits are its forward pass
    under bf16 autocast (computed here batch by batch), not the float32 one."""
    cfg = _cfg(precision="bf16")
    train_run(cfg, tmp_path, log=lambda m: None)
    ld = loading.load_model(tmp_path / cfg.run_id())
    assert ld.precision == "bf16"
    logits = run_predictions(ld, corruptions=False, log=lambda m: None)["logits"]
    with torch.no_grad():
        xs = [x for x, _ in loading.test_loader(ld).epoch(0)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = torch.cat([ld.model(x).float() for x in xs])
        fp32 = torch.cat([ld.model(x) for x in xs])
    assert torch.equal(logits, bf16) and not torch.equal(logits, fp32)


def test_diagnose_and_fold_commands(runs, capsys):
    _, paths = runs
    assert main(["diagnose", str(paths["bn"]), "--precise-batches", "2"]) == 0
    text = capsys.readouterr().out
    assert "eval-mode accuracy" in text and "not measurable" in text  # BN1d at batch 1
    diag = json.loads((paths["bn"] / "diagnose.json").read_text())
    summary = json.loads((paths["bn"] / "summary.json").read_text())
    assert diag["eval_acc"] == pytest.approx(summary["test_acc"], abs=1e-12)
    assert main(["diagnose", str(paths["none"]), "--precise-batches", "2"]) == 0
    assert "not applicable" in capsys.readouterr().out
    assert main(["fold", str(paths["bn"] / "checkpoint.pt"), "--repeats", "2"]) == 0
    text = capsys.readouterr().out
    assert "folded 3 norm layers" in text and "ok the limit" in text
    fold = json.loads((paths["bn"] / "fold.json").read_text())
    assert fold["parity"]["rel_diff"] <= 1e-5 and [s["batch"] for s in fold["speed"]] == [1, 256]


def test_bad_checkpoints_are_one_line_errors(runs, tmp_path, capsys):
    _, paths = runs
    trunc = tmp_path / "trunc" / "checkpoint.pt"
    trunc.parent.mkdir()
    data = (paths["bn"] / "checkpoint.pt").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    assert str(trunc) in one_line_error(capsys, ["fold", str(trunc)])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert str(text) in one_line_error(capsys, ["diagnose", str(text)])
    state = torch.load(paths["bn"] / "checkpoint.pt", weights_only=True)
    state["config"]["model"] = "resnet20"  # weights of an MLP under a ResNet config
    other = tmp_path / "other.pt"
    torch.save(state, other)
    err = one_line_error(capsys, ["fold", str(other)])
    assert str(other) in err and "does not match model 'resnet20'" in err


def test_compare_refuses_another_test_set(runs, tmp_path, capsys):
    _, paths = runs
    copy = tmp_path / paths["none"].name
    shutil.copytree(paths["none"], copy)
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    state["config"]["limit_test"] = 64
    torch.save(state, copy / "checkpoint.pt")
    err = one_line_error(capsys, ["compare", str(paths["bn"]), str(copy), "--out",
                                  str(tmp_path / "a"), "--no-corruptions"])
    assert str(copy / "checkpoint.pt") in err and "another test set" in err


def test_compare_refuses_other_classes(runs, tmp_path, capsys):
    _, paths = runs
    root = tmp_path / "folder"
    write_image_folder(root, size=32, eval_name="test")  # 3 classes
    cfg = _cfg(dataset=f"imagefolder:{root}", limit_train=0, limit_test=0, batch_size=4)
    train_run(cfg, tmp_path / "runs3", log=lambda m: None)
    third = tmp_path / "runs3" / cfg.run_id()
    err = one_line_error(capsys, ["compare", str(paths["bn"]), str(third), "--no-corruptions",
                                  "--out", str(tmp_path / "a")])
    assert str(third / "checkpoint.pt") in err and "3 classes" in err


def _loaded(path, cfg=None):
    """Enough of a loaded model for the labels: its file and config."""
    return loading.Loaded(Path(path), cfg, model=None, bundle=None, device=None)


def test_runs_differing_only_in_speed_options_and_seed_are_one_arm():
    """compile, cuda_graph, cpu_kernels (and probes) change how fast a run computes, not what:
    seeds of one configuration that differ in them are one arm, as in the study report."""
    from bnlab.infer.compare import default_labels
    from bnlab.report.load import NOT_ARM_AXES

    loaded = [_loaded("a/checkpoint.pt", _cfg(norm="bn", seed=0)),
              _loaded("b/checkpoint.pt", _cfg(norm="bn", seed=1, cpu_kernels=False)),
              _loaded("c/checkpoint.pt", _cfg(norm="bn", seed=2, compile=True,
                                              cuda_graph=False, probe_every=5,
                                              probe_step_sizes=[0.5]))]
    assert default_labels(loaded) == ["norm=bn"] * 3
    loaded.append(_loaded("d/checkpoint.pt", _cfg(norm="bn", seed=0, lr=0.1, compile=True)))
    assert default_labels(loaded) == ["lr=0.05"] * 3 + ["lr=0.1"]
    # the report's arms leave out the same options
    for key in ("seed", "compile", "cuda_graph", "cpu_kernels", "probe_every",
                "probe_step_sizes", "device", "workers"):
        assert key in NOT_ARM_AXES


def test_user_models_with_one_file_name_get_distinct_labels():
    """bn_run/model.pt and nobn_run/model.pt are two models, not two seeds of 'model'."""
    from bnlab.infer.compare import default_labels

    def labels(*paths):
        return default_labels([_loaded(p) for p in paths])

    assert labels("x/bn_run/model.pt", "x/nobn_run/model.pt", "x/other.pt") == [
        "bn_run/model", "nobn_run/model", "other"]
    assert labels("a/bn/s0/model.pt", "a/nobn/s0/model.pt") == ["bn/s0/model", "nobn/s0/model"]
    assert labels("net.pt", "net.pth") == ["net.pt", "net.pth"]
    assert labels("w/net.pt", "net.pt") == ["w/net", "net.pt"]
    assert labels("net.pt", "./net.pt") == ["net", "net"]  # one file twice: one label
    run = _loaded("r/checkpoint.pt", _cfg(norm="bn"))
    assert default_labels([run, _loaded("u/model.pt"), _loaded("v/model.pt")]) == [
        "norm=bn", "u/model", "v/model"]
