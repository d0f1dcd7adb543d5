"""`bnlab compare`, `diagnose` and `fold` on checkpoints of a plain net and of a torchvision
model with swapped norms (tiny runs on synthetic 32 px data)."""

from __future__ import annotations

import json

import pytest
import torch

from bnlab.cli import main
from bnlab.config import from_mapping
from bnlab.store import Store
from bnlab.train import train_run

pytestmark = pytest.mark.usefixtures("one_thread")
MODELS = ("plain20", "torchvision:mobilenet_v3_small")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    paths = {}
    for model in MODELS:
        cfg = from_mapping(dict(dataset="synthetic", model=model, limit_train=64, limit_test=32,
                                batch_size=16, epochs=1, lr=0.02, device="cpu",
                                cpu_kernels=False))
        train_run(cfg, out, log=lambda m: None)
        paths[model] = out / cfg.run_id()
    return out, paths


def test_compare_diagnose_and_fold(runs, tmp_path, capsys):
    out, paths = runs
    a, b = (str(paths[m]) for m in MODELS)
    assert main(["compare", a, b, "--out", str(tmp_path / "cmp")]) == 0
    res = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    for m in res["runs"]:  # the test accuracy the training loop measured, by a second path
        want = Store(out).run(m["run_id"]).summary["test_acc"]
        assert m["test_acc"] == pytest.approx(want, abs=1e-12)
    for model, norms in zip(MODELS, (19, 34)):
        path = paths[model]
        capsys.readouterr()
        assert main(["diagnose", str(path), "--precise-batches", "2"]) == 0
        diag = json.loads((path / "diagnose.json").read_text())
        assert diag["eval_acc"] == pytest.approx(Store(out).run(path.name).summary["test_acc"],
                                                 abs=1e-12)
        assert main(["fold", str(path / "checkpoint.pt"), "--repeats", "1"]) == 0
        assert f"folded {norms} norm layers" in capsys.readouterr().out
        fold = json.loads((path / "fold.json").read_text())
        assert fold["parity"]["ok"] and torch.isfinite(torch.tensor(fold["parity"]["rel_diff"]))
