"""`diagnose`, `fold` and `compare` on a user's own model: an entry point defined here, a
state_dict file and a dataset spec. A planted mismatch (one layer's running statistics
estimated on other data) must be found by diagnose; every bad input is one line, exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import one_line_error
from torch import nn

from bnlab.cli import main
from bnlab.data import load_data
from bnlab.data.synthetic import make_synthetic
from bnlab.infer.diagnose import diagnose
from bnlab.infer.usermodel import build_entry, load_user_model

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRY = "test_user_model:make_net"  # tests/ is on sys.path under pytest
FILE_ENTRY = f"{Path(__file__)}:make_net"


class SmallNet(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def make_net():
    return SmallNet()


def make_five_class_net():
    return SmallNet(5)


def not_a_module():
    return 3


def broken():
    raise RuntimeError("no weights here\nsecond line")


def _normalized(x, bundle):
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A trained SmallNet (good.pt) and the same net whose bn2 statistics were estimated on
    other data: the images of another synthetic set at a quarter of their brightness, as with
    another preprocessing (planted.pt)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bundle = load_data("synthetic")
        torch.manual_seed(0)
        model = make_net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = _normalized(bundle.train.x, bundle), bundle.train.y
        model.train()
        for _ in range(4):
            for i in range(0, len(y), 64):
                loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():  # settle the running statistics on the training data
            for i in range(0, len(y), 64):
                model(x[i:i + 64])
        root = tmp_path_factory.mktemp("weights")
        torch.save(model.state_dict(), root / "good.pt")
        other = make_synthetic(seed=99)
        ox = _normalized(other.train.x // 4, bundle)
        model.eval()
        model.bn2.train()
        model.bn2.reset_running_stats()
        model.bn2.momentum = None  # a plain average over the other data's batches
        with torch.no_grad():
            for i in range(0, len(ox), 64):
                model(ox[i:i + 64])
        torch.save(model.state_dict(), root / "planted.pt")
    finally:
        torch.set_num_threads(threads)
    return root


def test_diagnose_finds_the_planted_mismatch(weights, capsys):
    planted = diagnose(load_user_model(ENTRY, weights / "planted.pt", "synthetic"),
                       (32, 256), precise_batches=8, log=lambda m: None)
    good = diagnose(load_user_model(ENTRY, weights / "good.pt", "synthetic"), (32, 256),
                    precise_batches=8, log=lambda m: None)
    train_mode = planted["train_mode_acc"]["256"]
    # the weights are the same, so train mode (batch statistics) is the same
    assert train_mode == pytest.approx(good["train_mode_acc"]["256"], abs=1e-12)
    assert train_mode > 0.8 and planted["eval_acc"] < train_mode - 0.3
    assert planted["precise_acc"] > train_mode - 0.05
    assert planted["precise"]["ranking"][0] == "bn2"
    gaps = {g["layer"]: g for g in planted["precise"]["gaps"]}
    assert gaps["bn2"]["kl_mean"] > 10 * gaps["bn1"]["kl_mean"]
    assert "recover it" in planted["answer"][1] and "bn2" in planted["answer"][2]
    assert good["eval_acc"] > train_mode - 0.05 and "not worse" in good["answer"][0]

    assert main(["diagnose", "--model-entry", FILE_ENTRY, "--weights",
                 str(weights / "planted.pt"), "--dataset", "synthetic", "--batch-sizes",
                 "32,256", "--precise-batches", "8"]) == 0
    text = capsys.readouterr().out
    assert "answer:" in text and "Layers whose running statistics disagree most with the " \
        "training data: bn2" in text
    assert not (weights / "diagnose.json").exists()  # a user's folder is not written to


def test_fold_and_compare_take_the_user_model(weights, tmp_path, capsys):
    assert main(["fold", "--model-entry", ENTRY, "--weights", str(weights / "good.pt"),
                 "--dataset", "synthetic", "--repeats", "1"]) == 0
    assert "folded 2 norm layers" in capsys.readouterr().out
    out = tmp_path / "cmp"
    assert main(["compare", "--model-entry", ENTRY, "--weights", str(weights / "good.pt"),
                 "--weights", str(weights / "planted.pt"), "--dataset", "synthetic",
                 "--out", str(out), "--no-corruptions"]) == 0
    res = json.loads((out / "compare.json").read_text())
    assert [a["label"] for a in res["arms"]] == ["good", "planted"]
    assert res["runs"][0]["test_acc"] > res["runs"][1]["test_acc"] + 0.3
    assert not (weights / "predictions.pt").exists()


def test_bad_user_models_are_one_line_errors(weights, tmp_path, capsys):
    good = str(weights / "good.pt")

    def run(entry, w=good, dataset="synthetic"):
        return one_line_error(capsys, ["diagnose", "--model-entry", entry, "--weights", w,
                                       "--dataset", dataset])

    assert "is not MODULE:FUNCTION" in run("no_colon")
    assert "cannot import module 'no_such_module_xyz'" in run("no_such_module_xyz:f")
    assert "has no attribute 'nope'" in run("test_user_model:nope")
    assert "returned a int, not a torch.nn.Module" in run("test_user_model:not_a_module")
    assert "raised RuntimeError: no weights here" in run("test_user_model:broken")
    assert "does not exist" in run(str(tmp_path / "nofile.py") + ":f")
    linear = tmp_path / "linear.pt"
    torch.save(nn.Linear(3, 2).state_dict(), linear)
    err = run(ENTRY, str(linear))
    assert str(linear) in err and "does not fit the model" in err
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    assert "holds a list, not a state_dict" in run(ENTRY, str(listed))
    pickled = tmp_path / "object.pt"
    torch.save({"model": SmallNet()}, pickled)  # a whole module: weights_only refuses it
    assert "holds objects other than tensors and is not loaded" in run(ENTRY, str(pickled))
    five = tmp_path / "five.pt"
    torch.save(make_five_class_net().state_dict(), five)
    assert "needs logits of shape (2, 10)" in run("test_user_model:make_five_class_net",
                                                   str(five))
    assert "missing --dataset" in one_line_error(capsys, ["fold", "--model-entry", ENTRY,
                                                          "--weights", good])
    assert "not both" in one_line_error(capsys, ["fold", str(weights), "--model-entry", ENTRY])
    assert "give a CHECKPOINT" in one_line_error(capsys, ["diagnose"])
    assert "need --weights FILE" in one_line_error(capsys, ["compare", "--model-entry", ENTRY,
                                                            "--dataset", "synthetic"])


def test_a_model_file_runs_as_a_script_would(tmp_path, capsys):
    """path/to/nets.py:make_net with a dataclass under `from __future__ import annotations`
    (resolved through sys.modules) and imports of a sibling module, at the top and inside the
    function: it builds, and sys.path is as it was."""
    folder = tmp_path / "user code"
    folder.mkdir()
    (folder / "bnlab_sibling_blocks.py").write_text(
        "from torch import nn\n\n\ndef block(width):\n    return nn.Linear(width, width)\n")
    (folder / "nets.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from torch import nn\n"
        "from bnlab_sibling_blocks import block\n\n\n"
        "@dataclass\nclass Spec:\n    width: int = 4\n\n\n"
        "def make_net():\n"
        "    import bnlab_sibling_late\n"
        "    return nn.Sequential(block(Spec().width), bnlab_sibling_late.norm(Spec().width))\n")
    (folder / "bnlab_sibling_late.py").write_text(
        "from torch import nn\n\n\ndef norm(width):\n    return nn.BatchNorm1d(width)\n")
    (folder / "spec_only.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "from torch import nn\n\n\n"
        "@dataclass\nclass Spec:\n    width: int = 4\n\n\n"
        "def make_net():\n    return nn.Linear(Spec().width, 2)\n")
    before = list(sys.path)
    try:
        assert isinstance(build_entry(f"{folder / 'spec_only.py'}:make_net"), nn.Linear)
        model = build_entry(f"{folder / 'nets.py'}:make_net")
        assert [type(m) for m in model] == [nn.Linear, nn.BatchNorm1d]
        assert sys.path == before
        # a failing file leaves sys.path and sys.modules as they were, and says why in a line
        (folder / "bad.py").write_text("raise ValueError('no net')\n")
        err = one_line_error(capsys, ["fold", "--model-entry", f"{folder / 'bad.py'}:f",
                                      "--weights", str(tmp_path / "w.pt"), "--dataset",
                                      "synthetic"])
        assert "raised ValueError: no net" in err
        assert sys.path == before and "bnlab_user_bad" not in sys.modules
    finally:
        for name in ("bnlab_sibling_blocks", "bnlab_sibling_late", "bnlab_user_nets",
                     "bnlab_user_spec_only"):
            sys.modules.pop(name, None)
