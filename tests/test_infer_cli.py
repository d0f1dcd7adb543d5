"""`bnlab compare`, `diagnose` and `fold` end to end on tiny runs, and their bad-input errors."""

import json
import shutil

import pytest
import torch
from conftest import write_image_folder

from bnlab.cli import main
from bnlab.config import from_mapping
from bnlab.store import Store
from bnlab.train import train_run

CONTRACT_MODEL_KEYS = {"run_id", "label", "test_acc", "nll", "brier", "ece", "per_class_acc",
                       "corruption_acc"}
CONTRACT_PAIR_KEYS = {"a", "b", "agreement", "right_to_wrong", "wrong_to_right", "both_right",
                      "both_wrong", "kl_ab", "kl_ba", "js"}


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
        cfg = _cfg(norm=norm)
        train_run(cfg, out, log=lambda m: None)
        paths[norm] = out / cfg.run_id()
    yield out, paths
    torch.set_num_threads(threads)


def test_compare_writes_contract_json_and_figures(runs, tmp_path, capsys):
    out, paths = runs
    dest = tmp_path / "analysis"
    assert main(["compare", str(paths["bn"]), str(paths["none"]), "--out", str(dest)]) == 0
    text = capsys.readouterr().out
    assert "norm=bn" in text and "norm=none" in text and "gaussian_noise" in text
    res = json.loads((dest / "compare.json").read_text())
    assert res["figures"] == ["reliability.png", "confidence.png", "corruptions.png"]
    for f in res["figures"]:
        assert (dest / f).read_bytes()[:4] == b"\x89PNG"
    summaries = {p.name: Store(out).run(p.name).summary for p in paths.values()}
    for m in res["models"]:
        assert CONTRACT_MODEL_KEYS <= set(m)
        # the same number the training loop measured, by a second path
        assert m["test_acc"] == pytest.approx(summaries[m["run_id"]]["test_acc"], abs=1e-12)
        assert set(m["corruption_acc"]) == {"gaussian_noise", "gaussian_blur", "contrast",
                                            "brightness"}
        assert all(len(v) == 5 for v in m["corruption_acc"].values())
    (pair,) = res["pairs"]
    assert CONTRACT_PAIR_KEYS <= set(pair)
    assert pair["both_right"] + pair["both_wrong"] + pair["right_to_wrong"] + \
        pair["wrong_to_right"] == 96
    acc_a, acc_b = res["models"][0]["test_acc"], res["models"][1]["test_acc"]
    assert (pair["both_right"] + pair["right_to_wrong"]) / 96 == pytest.approx(acc_a)
    assert (pair["both_right"] + pair["wrong_to_right"]) / 96 == pytest.approx(acc_b)


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


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_checkpoints_are_one_line_errors(runs, tmp_path, capsys):
    _, paths = runs
    trunc = tmp_path / "trunc" / "checkpoint.pt"
    trunc.parent.mkdir()
    data = (paths["bn"] / "checkpoint.pt").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    assert str(trunc) in _error(capsys, ["fold", str(trunc)])
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert str(text) in _error(capsys, ["diagnose", str(text)])
    state = torch.load(paths["bn"] / "checkpoint.pt", weights_only=True)
    state["config"]["model"] = "resnet20"  # weights of an MLP under a ResNet config
    other = tmp_path / "other.pt"
    torch.save(state, other)
    err = _error(capsys, ["fold", str(other)])
    assert str(other) in err and "does not match model 'resnet20'" in err


def test_compare_refuses_another_test_set(runs, tmp_path, capsys):
    _, paths = runs
    copy = tmp_path / paths["none"].name
    shutil.copytree(paths["none"], copy)
    state = torch.load(copy / "checkpoint.pt", weights_only=True)
    state["config"]["limit_test"] = 64
    torch.save(state, copy / "checkpoint.pt")
    err = _error(capsys, ["compare", str(paths["bn"]), str(copy), "--out", str(tmp_path / "a"),
                          "--no-corruptions"])
    assert str(copy / "checkpoint.pt") in err and "another test set" in err


def test_compare_refuses_other_classes(runs, tmp_path, capsys):
    _, paths = runs
    root = tmp_path / "folder"
    write_image_folder(root, size=32, eval_name="test")  # 3 classes
    cfg = _cfg(dataset=f"imagefolder:{root}", limit_train=0, limit_test=0, batch_size=4)
    train_run(cfg, tmp_path / "runs3", log=lambda m: None)
    third = tmp_path / "runs3" / cfg.run_id()
    err = _error(capsys, ["compare", str(paths["bn"]), str(third), "--no-corruptions",
                          "--out", str(tmp_path / "a")])
    assert str(third / "checkpoint.pt") in err and "3 classes" in err
