"""Every error a user can cause: one line on stderr naming the value, exit code 2."""

import pytest
from conftest import write_image_folder
from helpers import one_line_error, run_cli

from bnlab.cli import main

TINY = ["--device", "cpu", "--epochs", "1", "--limit-train", "64", "--limit-test", "32",
        "--batch-size", "32", "--eval-batch-size", "32"]


@pytest.mark.parametrize("argv,needles", [
    (["train", "--dataset", "cifar11"], ["'cifar11'", "did you mean 'cifar10'", "mnist"]),
    (["train", "--dataset", "synthetic", "--model", "resnet21"], ["'resnet21'", "resnet20"]),
    (["train", "--dataset", "synthetic", "--norm", "bogus"], ["'bogus'", "bn"]),
    (["train", "--lr", "-1"], ["lr must be > 0", "-1"]),
    (["train", "--lr", "0"], ["lr must be > 0"]),
    (["train", "--epochs", "0"], ["epochs must be > 0"]),
    (["train", "--batch-size", "-5"], ["batch_size must be > 0", "-5"]),
    (["train", "--epochs", "two"], ["epochs must be an integer", "'two'"]),
    (["train", "--schedule", "cosin"], ["'cosin'", "did you mean 'cosine'"]),
    (["train", "--precision", "fp8"], ["'fp8'", "bf16"]),
    (["train", "--epoks", "3"], ["--epoks", "did you mean '--epochs'"]),
])
def test_bad_values(capsys, argv, needles):
    one_line_error(capsys, argv, *needles)


def test_missing_and_empty_data_dirs(capsys, tmp_path):
    one_line_error(capsys, ["train", "--dataset", "mnist", "--data-dir",
                            str(tmp_path / "nope")], "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["train", "--dataset", "mnist", "--data-dir",
                            str(tmp_path / "empty")], "train-images-idx3-ubyte", "empty")
    one_line_error(capsys, ["train", "--dataset", "cifar10", "--data-dir",
                            str(tmp_path / "empty")], "cifar-10-batches-py")
    one_line_error(capsys, ["train", "--dataset", f"imagefolder:{tmp_path / 'empty'}"],
                   "train/")
    one_line_error(capsys, ["train", "--dataset", f"imagefolder:{tmp_path / 'missing'}"],
                   "does not exist")


def test_malformed_toml_and_unknown_key(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = [1,\n")
    one_line_error(capsys, ["train", "--config", str(bad)], "bad.toml", "not valid TOML")
    typo = tmp_path / "typo.toml"
    typo.write_text("epoch = 3\n")
    one_line_error(capsys, ["train", "--config", str(typo)], "'epoch'",
                   "did you mean 'epochs'")
    one_line_error(capsys, ["train", "--config", str(tmp_path / "none.toml")], "does not exist")


def test_corrupt_image(capsys, tmp_path):
    write_image_folder(tmp_path / "ds", size=8)
    (tmp_path / "ds" / "train" / "b" / "0001.png").write_bytes(b"not an image at all")
    line = one_line_error(capsys, ["train", "--dataset", f"imagefolder:{tmp_path / 'ds'}",
                                   *TINY, "--out", str(tmp_path / "out")], "corrupt image")
    assert "0001.png" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()) or all(
        p.name.startswith("index") for p in (tmp_path / "out").iterdir())


def test_config_file_then_flags_override(capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\ndataset = "synthetic"\nepochs = 5\nlr = 0.02\nnorm = "none"\n')
    rc, out, err = run_cli(capsys, "train", "--config", str(cfg), *TINY, "--out",
                           str(tmp_path / "o"))
    assert rc == 0, err
    import json

    run_dir = next(p for p in (tmp_path / "o").iterdir() if p.is_dir())
    stored = json.loads((run_dir / "config.json").read_text())["config"]
    assert stored["epochs"] == 1 and stored["lr"] == 0.02 and stored["norm"] == "none"
    rc, out, err = run_cli(capsys, "runs", "--out", str(tmp_path / "o"))
    assert rc == 0 and run_dir.name in out and "synthetic" in out
    one_line_error(capsys, ["train", "--config", str(cfg), *TINY, "--out", str(tmp_path / "o")],
                   "already exists", "--resume")


def test_help_lists_every_option_with_default_and_unit(capsys):
    from bnlab.config import FIELDS

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for name in FIELDS:
        assert "--" + name.replace("_", "-") in out
    assert "(default: 128)" in out and "[images]" in out and "[epochs]" in out


def test_runs_on_a_folder_that_is_not_a_store(capsys, tmp_path):
    one_line_error(capsys, ["runs", "--out", str(tmp_path)], "index.sqlite")


def test_study_run_lets_openmp_sleep_only_on_a_shared_cpu(monkeypatch):
    import os

    from bnlab.cli import _cpu_shared

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert _cpu_shared(1) is False
    assert _cpu_shared(2) is True
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 0.0, 0.0))  # half of the 4 cores
    assert _cpu_shared(1) is True
    monkeypatch.setattr(os, "getloadavg", lambda: (1.99, 9.0, 9.0))  # the 1-minute one counts
    assert _cpu_shared(1) is False
