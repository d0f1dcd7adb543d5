"""A user's own network in runs and studies: model = "entry:MODULE:FUNCTION", a function of
num_classes and norm defined here. BN and no-BN variants train through `bnlab train` and through
a study whose report builds; the entry's source file enters the run id; every bad entry is one
line, exit 2."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab.cli import main
from bnlab.config import from_json_dict, from_mapping
from bnlab.data import load_data
from bnlab.errors import UserError
from bnlab.models import build_for
from bnlab.models.entry import NormFactory
from bnlab.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__)
ENTRY = "entry:test_entry_model:make_net"  # tests/ is on sys.path under pytest
FILE_ENTRY = f"entry:{HERE}:make_net"
TINY = ["--dataset", "synthetic", "--device", "cpu", "--epochs", "1", "--limit-train", "64",
        "--limit-test", "32", "--batch-size", "16", "--eval-batch-size", "32", "--lr", "0.05",
        "--no-cpu-kernels"]


class TwoConvNet(nn.Module):
    def __init__(self, num_classes: int, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=norm.conv_bias)
        self.norm1 = norm(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=norm.conv_bias)
        self.norm2 = norm(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def make_net(num_classes, norm):
    return TwoConvNet(num_classes, norm)


def make_mlp(num_classes, norm, in_channels, image_size):  # takes the data's shape too
    d = in_channels * image_size * image_size
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), norm(32, dim=1), nn.ReLU(),
                         nn.Linear(32, num_classes))


def no_arguments():
    return TwoConvNet(10, NormFactory("bn"))


def needs_depth(num_classes, norm, depth):
    return TwoConvNet(num_classes, norm)


def not_a_module(num_classes, norm):
    return "a string"


def ignores_norm(num_classes, norm):
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))


def discards_norm(num_classes, norm):
    norm(8)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))


def own_batchnorm(num_classes, norm):
    net = TwoConvNet(num_classes, norm)
    net.norm2 = nn.BatchNorm2d(16)  # hard-wired: it would normalize in the no-BN arm too
    return net


def wrong_logits(num_classes, norm):
    return TwoConvNet(num_classes + 1, norm)


def raises(num_classes, norm):
    raise RuntimeError("out of ideas\nsecond line")


def test_bn_and_none_train_through_bnlab_train(tmp_path, capsys):
    out = tmp_path / "out"
    for norm in ("bn", "none"):
        assert main(["train", "--model", ENTRY, "--norm", norm, "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    store = Store(out)
    runs = {store.run(r).config["norm"]: store.run(r) for r in sorted(
        p.name for p in out.iterdir() if p.is_dir())}
    assert sorted(runs) == ["bn", "none"]
    for norm, run in runs.items():
        assert run.summary["status"] in ("completed", "no_learning")
        assert run.summary["epochs_done"] == 1
        assert run.run_id.startswith(f"entry-test_entry_model.make_net-{norm}-synthetic-s0-")
        state = run.load_checkpoint()["model"]
        # the norm the run names is the norm it trained with: running statistics where its
        # factory made BatchNorms, and a bias on each conv (norm.conv_bias) where it made none
        assert ("norm1.running_mean" in state) == (norm == "bn")
        assert ("conv1.bias" in state) == (norm == "none")
        assert state.keys() == make_net(10, NormFactory(norm)).state_dict().keys()


def test_the_function_initializes_its_own_weights():
    """bnlab's init (kaiming by default) is not applied: the run's model is, weight for
    weight, what the function builds from the same seed."""
    cfg = from_mapping({"dataset": "synthetic", "model": ENTRY, "norm": "none"})
    torch.manual_seed(3)
    built = build_for(cfg, load_data("synthetic")).state_dict()
    torch.manual_seed(3)
    own = make_net(10, NormFactory("none")).state_dict()
    assert built.keys() == own.keys()
    assert all(torch.equal(built[k], own[k]) for k in own)


def test_a_model_of_the_data_shape_trains_on_features(tmp_path, capsys):
    out = tmp_path / "out"
    entry = "entry:test_entry_model:make_mlp"
    assert main(["train", "--model", entry, "--norm", "bn", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    state = Store(out).run(run_dir.name).load_checkpoint()["model"]
    assert state["2.running_mean"].shape == (32,)  # a BatchNorm1d over the 32 features


SPEC = """
name = "own-net"
[base]
dataset = "synthetic"
model = "{entry}"
limit_train = 64
limit_test = 32
batch_size = 16
eval_batch_size = 32
epochs = 2
lr = 0.05
device = "cpu"
cpu_kernels = false
probe_every = 2
[grid]
norm = ["bn", "none"]
seed = [0]
"""


def test_a_study_of_bn_against_none_and_its_report(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC.format(entry=FILE_ENTRY)))
    out = tmp_path / "study"
    assert main(["study", "run", str(spec), "--out", str(out)]) == 0
    meta = json.loads((out / "study.json").read_text())
    assert meta["axes"] == ["norm"]
    store = Store(out)
    for r in meta["runs"]:
        run = store.run(r["run_id"])
        assert run.summary["status"] in ("completed", "no_learning"), run.summary
        assert run.config["model"] == FILE_ENTRY  # already absolute: kept as given
        layers = {row["layer"] for row in run.read_rows("probes.jsonl")
                  if row["metric"] == "act_mean"}
        # the probes find the norm positions in both arms (nn.Identity where norm is none)
        assert {"norm1", "norm2"} <= layers
    capsys.readouterr()
    assert main(["study", "report", str(out)]) == 0
    text = (out / "report" / "report.md").read_text()
    assert "norm=bn" in text and "norm=none" in text


def test_the_source_file_enters_the_run_id(tmp_path):
    src = tmp_path / "net.py"
    shutil.copy(HERE, src)
    base = {"dataset": "synthetic", "model": f"entry:{src}:make_net"}
    a = from_mapping(base)
    assert from_mapping(base).run_id() == a.run_id()  # the same file: the same id
    assert a.model_source == __import__("hashlib").sha256(src.read_bytes()).hexdigest()[:16]
    stored = from_json_dict(json.loads(json.dumps(a.to_dict())))
    src.write_text(src.read_text() + "\n# an edit\n")
    b = from_mapping(base)
    assert b.run_id() != a.run_id() and b.model_source != a.model_source
    # a stored config keeps the id it was made with; building it from the edited file is
    # refused rather than training other code under that id
    assert stored.run_id() == a.run_id()
    with pytest.raises(UserError, match="source file changed since"):
        build_for(stored, load_data("synthetic"))
    # models without an entry keep the ids they always had
    plain = from_mapping({"dataset": "synthetic"})
    assert "model_source" not in json.dumps({k: v for k, v in plain.to_dict().items() if v})


def test_a_relative_file_entry_is_made_absolute(tmp_path, monkeypatch):
    shutil.copy(HERE, tmp_path / "net.py")
    monkeypatch.chdir(tmp_path)
    cfg = from_mapping({"model": "entry:net.py:make_net"})
    assert cfg.model == f"entry:{tmp_path / 'net.py'}:make_net"
    assert cfg.run_id() == from_mapping({"model": cfg.model}).run_id()


@pytest.mark.parametrize("model,extra,needles", [
    ("entry:no_such_module_here:make_net", [], ["'no_such_module_here'", "cannot import"]),
    ("entry:test_entry_model:missing", [], ["has no attribute 'missing'"]),
    ("entry:test_entry_model", [], ["is not entry:MODULE:FUNCTION"]),
    ("entry:/no/such/file.py:make_net", [], ["'/no/such/file.py' does not exist"]),
    ("entry:test_entry_model:no_arguments", [], ["does not take num_classes, norm"]),
    ("entry:test_entry_model:needs_depth", [], ["requires depth"]),
    ("entry:test_entry_model:not_a_module", [], ["returned a str, not a torch.nn.Module"]),
    ("entry:test_entry_model:ignores_norm", [],
     ["the model built no norm layer although norm='bn'", "never called norm(channels)"]),
    ("entry:test_entry_model:discards_norm", [],
     ["no norm layer although norm='bn'", "holds none of the layers"]),
    ("entry:test_entry_model:own_batchnorm", ["--norm", "none"],
     ["BatchNorm2d 'norm2'", "norm factory did not make", "norm='none'"]),
    ("entry:test_entry_model:wrong_logits", [], ["returns (2, 11)", "shape (2, 10)"]),
    ("entry:test_entry_model:raises", [], ["raised RuntimeError: out of ideas"]),
    (ENTRY, ["--init", "xavier"], ["init 'xavier' applies to bnlab's own models"]),
    (ENTRY, ["--placement", "post_act"], ["placement 'post_act'", "norm(channels)"]),
    (ENTRY, ["--dropout", "0.1"], ["dropout 0.1 applies to bnlab's own models"]),
    (ENTRY, ["--norm-options", '{"groups": 2}'], ["unknown option 'groups' for norm 'bn'"]),
])
def test_bad_entries_are_one_line_errors(tmp_path, capsys, model, extra, needles):
    out = tmp_path / "out"
    rc = main(["train", "--model", model, "--out", str(out), *TINY, *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not any(p.is_dir() for p in out.glob("*")), "a refused run leaves no folder"


def test_a_study_refuses_a_missing_entry_before_training(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC.format(entry="entry:test_entry_model:nothing")))
    assert main(["study", "run", str(spec), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has no attribute 'nothing'" in err and len(err.strip().splitlines()) == 1, err


EXAMPLE = HERE.resolve().parents[1] / "examples" / "notebook_own_model.py"


@pytest.mark.slow  # a whole example script in a new process (20 s)
def test_the_example_studies_a_network_defined_in_the_script(tmp_path):
    """examples/notebook_own_model.py run as a user runs it: a study of its own network with
    and without BN, a plot from the DataFrames, the BN arm diagnosed and recalibrated."""
    import hashlib
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(EXAMPLE.parents[1]), PYTHONUNBUFFERED="1")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    png = out / "train_loss_by_arm.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "study.json").read_text())
    store = Store(out)
    digest = hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()[:16]
    norms = []
    for r in meta["runs"]:
        run = store.run(r["run_id"])
        assert run.config["model"] == f"entry:{EXAMPLE}:make_net"
        assert run.config["model_source"] == digest  # the file as it is now
        assert run.summary["status"] in ("completed", "no_learning")
        norms.append(run.config["norm"])
    assert sorted(norms) == ["bn", "bn", "none", "none"]
    bn0 = next(r["run_id"] for r in meta["runs"]
               if r["values"]["norm"] == "bn" and r["values"]["seed"] == 0)
    # diagnosed and recalibrated in memory: numbers printed, nothing written to the run folder
    assert not (out / bn0 / "diagnose.json").exists()
    import re

    acc = re.search(r"eval-mode test accuracy (\d\.\d{4})", proc.stdout)
    pooled = re.search(r"recalibrated \(pooled\) (\d\.\d{4}), \(fvcore\) (\d\.\d{4})",
                       proc.stdout)
    moved = re.search(r"running mean moved by up to (\d+\.\d{4})", proc.stdout)
    assert acc and pooled and moved, proc.stdout[-2000:]
    assert 0.0 <= float(acc.group(1)) <= 1.0 and 0.0 <= float(pooled.group(1)) <= 1.0
    assert float(moved.group(1)) > 0  # the copy's statistics are new ones
