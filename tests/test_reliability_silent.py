"""What a careless or hostile user can do without a traceback but with a silently wrong result,
an unsafe export or an unreadable shared folder: each case ends in one line and exit code 2, or
is read correctly and said."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import tarfile
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ERROR, one_line_error, run_cli
from PIL import Image

from bnlab import cli
from bnlab.console import csv_text, records_csv, safe_cell
from bnlab.data import load_data
from bnlab.report.document import Table
from bnlab.report.tables_csv import table_csv
from bnlab.store import atomic_write_bytes
from bnlab.study import status

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "mlp3x100", "--limit-train", "64", "--limit-test", "64", "--batch-size",
        "32", "--epochs", "1", "--device", "cpu", "--no-cpu-kernels"]
FORMULA = "@SUM(1+1)"  # a dataset name a spreadsheet would run
SPEC = f"""
name = "inj"
[base]
dataset = "{FORMULA}"
model = "mlp3x100"
limit_train = 64
limit_test = 64
batch_size = 32
epochs = 1
device = "cpu"
cpu_kernels = false
[grid]
norm = ["bn", "none"]
"""


def _png(path: Path, px: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(px).save(path)


def _folder(root: Path, classes, size: int = 8, n: int = 3, blue: int | None = None) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            for i in range(n):
                px = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                if blue is not None:
                    px[..., 2] = blue
                _png(root / split / c / f"{i}.png", px)


def _add_png(tf: tarfile.TarFile, name: str, size: int = 8) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 7, np.uint8)).save(buf, format="PNG")
    info = tarfile.TarInfo(name)
    info.size = len(buf.getvalue())
    tf.addfile(info, io.BytesIO(buf.getvalue()))


# -- silent damage: data ---------------------------------------------------------------------
def test_class_names_with_a_newline_survive_an_archive(tmp_path):
    classes = ["x", "x\ny", "y"]  # "x\ny" split on the newline would become x and y
    folder = tmp_path / "f"
    _folder(folder, classes)
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="data")
    plain = load_data(f"imagefolder:{folder}")
    for _ in range(2):  # read from the archive, then from the cache entry it left
        packed = load_data(f"imagefolder:{archive}")
        assert packed.classes == plain.classes == sorted(classes)
        assert torch.equal(packed.train.y, plain.train.y)
        assert torch.equal(packed.train.x, plain.train.x)


def _archive_with(tmp_path: Path, extra: str, name: str = "d.tar") -> Path:
    archive = tmp_path / name
    with tarfile.open(archive, "w") as tf:
        for split in ("train", "val"):
            for c in ("a", "b"):
                _add_png(tf, f"ds/{split}/{c}/0.png")
        _add_png(tf, extra)
    return archive


def test_a_dotdot_member_reads_the_same_in_both_readers(tmp_path, monkeypatch):
    archive = _archive_with(tmp_path, "ds/train/../x.png")  # lies at ds/x.png: no class
    direct = load_data(f"imagefolder:{archive}")  # small images: read without extracting
    import bnlab.data.imagefolder as imagefolder

    monkeypatch.setattr(imagefolder, "SMALL_MAX", 4)  # 8 px images now stream: extracted
    extracted = load_data(f"imagefolder:{archive}", augment=False, image_size=8)
    assert direct.classes == extracted.classes == ["a", "b"]
    assert len(direct.train) == len(extracted.train) == 2


@pytest.mark.parametrize("member", ["ds/../../up.png", "../up.png", "/abs/train/a/1.png"])
@pytest.mark.parametrize("large", [False, True])
def test_a_member_outside_the_archive_is_refused_naming_it(tmp_path, capsys, monkeypatch,
                                                           member, large):
    archive = _archive_with(tmp_path, member)
    if large:  # an archive of large images is extracted, not read directly
        import bnlab.data.imagefolder as imagefolder

        monkeypatch.setattr(imagefolder, "SMALL_MAX", 4)
    line = one_line_error(capsys, ["train", "--dataset", f"imagefolder:{archive}", "--out",
                                   tmp_path / "o", *TINY], start=ERROR)
    assert repr(member) in line and "outside" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*/summary.json"))


def test_a_channel_that_never_varies_is_normalized_safely_and_said(tmp_path, capsys):
    _folder(tmp_path / "f", ["a", "b"], blue=0)
    rc, out, err = run_cli(capsys, "train", "--dataset", f"imagefolder:{tmp_path / 'f'}",
                           "--out", tmp_path / "o", *TINY)
    assert rc == 0, err
    assert "channel 2 (blue)" in err and "never varies" in err and "Traceback" not in err
    summary = json.loads(next((tmp_path / "o").glob("*/summary.json")).read_text())
    assert summary["status"] != "diverged" and np.isfinite(summary["test_loss"])
    bundle = load_data(f"imagefolder:{tmp_path / 'f'}")
    assert bundle.std[2] == 1.0 and bundle.std[0] > 0  # the varying channels keep theirs


def test_an_image_above_the_bomb_limit_is_one_line_without_pillows_warning(tmp_path, capsys,
                                                                          monkeypatch):
    _folder(tmp_path / "f", ["a", "b"], size=16)
    # 16x16 = 256 px: above a limit of 200, below twice it, where Pillow only warns
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        line = one_line_error(capsys, ["train", "--dataset", f"imagefolder:{tmp_path / 'f'}",
                                       "--out", tmp_path / "o", *TINY], start=ERROR)
    assert "too large to decode safely" in line and ".png" in line
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


# -- silent damage: the user's code ------------------------------------------------------------
FORWARD_EXITS = """
import sys
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("x", torch.zeros(1))

    def forward(self, x):
        sys.exit(4)


def make():
    return M()
"""


@pytest.mark.parametrize("body", [
    "import sys\ndef make():\n    sys.exit(3)\n",
    "def make():\n    exit()\n",
    "import sys\nsys.exit(0)\ndef make():\n    pass\n",  # at import
    FORWARD_EXITS,  # in its forward pass
])
def test_user_code_that_exits_fails_in_one_line(tmp_path, capsys, body):
    (tmp_path / "m.py").write_text(body)
    torch.save({"x": torch.zeros(1)}, tmp_path / "w.pt")
    line = one_line_error(capsys, ["fold", "--model-entry", f"{tmp_path / 'm.py'}:make",
                                   "--weights", tmp_path / "w.pt", "--dataset", "synthetic"],
                          start=ERROR)
    assert "SystemExit" in line and "m.py" in line


def test_fold_of_builtins_exit_fails_in_one_line(tmp_path, capsys):
    torch.save({"x": torch.zeros(1)}, tmp_path / "w.pt")
    line = one_line_error(capsys, ["fold", "--model-entry", "builtins:exit", "--weights",
                                   tmp_path / "w.pt", "--dataset", "synthetic"], start=ERROR)
    assert "'builtins:exit'" in line and "SystemExit" in line


# -- weights files -----------------------------------------------------------------------------
class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _weights_line(capsys, tmp_path, weights) -> str:
    return one_line_error(capsys, ["fold", "--model-entry", "torch.nn:Identity", "--weights",
                                   weights, "--dataset", "synthetic"], start=ERROR)


def test_weights_that_would_run_code_get_bnlabs_own_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    for i, save in enumerate((lambda p: torch.save({"w": Payload(marker)}, p),
                              lambda p: p.write_bytes(__import__("pickle").dumps(
                                  {"w": Payload(marker)}, protocol=4)))):
        p = tmp_path / f"payload{i}.pt"
        save(p)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            line = _weights_line(capsys, tmp_path, p)
        assert not seen  # torch's own note on the pickle protocol would be a second line
        assert line.endswith("holds objects other than tensors and is not loaded (bnlab reads "
                             "only tensors, numbers, strings and containers of them, so that "
                             "no file can run code)")
        assert "weights_only" not in line and "Re-running" not in line
    assert not marker.exists()


def test_a_folder_or_random_bytes_as_weights_get_their_own_line(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    assert "is a folder" in _weights_line(capsys, tmp_path, tmp_path / "dir")
    rand = tmp_path / "rand.pt"
    rand.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    line = _weights_line(capsys, tmp_path, rand)
    assert "is not a file saved by torch.save" in line and "Weights only" not in line
    cut = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(100)}, cut)
    cut.write_bytes(cut.read_bytes()[:300])
    assert "is not a file saved by torch.save" in _weights_line(capsys, tmp_path, cut)


# -- exports and shared folders ----------------------------------------------------------------
def test_safe_cell_follows_owasp():
    for bad in ("=1+1", "+1+1", "-1+1", "@SUM(A1)", "\t=1", "\r=1", "-", "=", "-x"):
        assert safe_cell(bad) == "'" + bad
    for ok in ("norm=bn", "a-b", "", "0.5", "-0.5", "+3", "-1e-05", ".5", "x=1"):
        assert safe_cell(ok) == ok
    for number in (-0.5, -3, 2.0):
        assert safe_cell(number) == number
    rows = list(csv.reader(io.StringIO(csv_text(["=h"], [["=a,b"], [-1]]))))
    assert rows == [["'=h"], ["'=a,b"], ["-1"]]
    assert records_csv([{"x": "+cmd", "d": {"a": 1}}]).splitlines()[1] == "'+cmd,\"{\"\"a\"\": 1}\""
    table = Table(number=1, anchor="t", title="t", head=["dataset", "acc"],
                  rows=[["=HYPERLINK(\"x\")", "-1.0 ± 0.5"]], numbered_rows=False)
    assert list(csv.reader(io.StringIO(table_csv(table))))[1] == \
        ["'=HYPERLINK(\"x\")", "'-1.0 ± 0.5"]


@pytest.fixture(scope="module")
def injected_study(tmp_path_factory):
    """A finished 2-run study whose dataset is named like a spreadsheet formula."""
    root = tmp_path_factory.mktemp("inj")
    (root / "spec.toml").write_text(textwrap.dedent(SPEC))
    assert cli.main(["study", "run", str(root / "spec.toml"), "--out", str(root / "out"),
                     "--data-map", f"{FORMULA}=synthetic"]) == 0
    return root / "out"


def _cells(text: str) -> list[str]:
    return [c for row in csv.reader(io.StringIO(text)) for c in row]


def test_every_csv_bnlab_writes_is_neutralized(injected_study, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(injected_study, out)
    texts = [run_cli(capsys, "runs", "--out", out, "--format", "csv")[1],
             run_cli(capsys, "study", "status", out, "--format", "csv")[1]]
    assert run_cli(capsys, "study", "report", out)[0] == 0
    texts += [p.read_text() for p in sorted((out / "report" / "tables").glob("*.csv"))]
    assert len(texts) > 2
    for text in texts[:2]:
        assert "'" + FORMULA in _cells(text)
    for text in texts:
        for cell in _cells(text):
            assert not cell.startswith(("=", "+", "@", "\t", "\r")), cell
            assert not cell.startswith("-") or safe_cell(cell) == cell, cell


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_a_plain_open_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == mode


def test_a_run_folder_is_readable_by_the_group_the_umask_allows(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        rc, _, err = run_cli(capsys, "train", "--dataset", "synthetic", "--out", tmp_path / "o",
                             *TINY)
    finally:
        os.umask(old)
    assert rc == 0, err
    files = [p for p in (tmp_path / "o").rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert any(p.name == "checkpoint.pt" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p


# -- messy: study size, damaged configs, missing index -----------------------------------------
def _seed_spec(tmp_path: Path, n: int, extra: str = "") -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(textwrap.dedent(SPEC).replace('dataset = "@SUM(1+1)"', 'dataset = "synthetic"')
                 .replace('norm = ["bn", "none"]', f"seed = {list(range(n))}")
                 .replace('name = "inj"', f'name = "many"\n{extra}'))
    return p


def test_a_large_study_prints_its_estimate_and_asks_for_yes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(status, "LARGE_STUDY", 2)
    spec = _seed_spec(tmp_path, 3)
    rc, out, err = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert out.splitlines()[0].startswith("study many: 3 of 3 runs to train, estimated ")
    assert "would train 3 runs" in err and "--yes" in err and "max_runs" in err
    assert not (tmp_path / "o").exists()  # nothing started
    rc, out, err = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o", "--yes")
    assert rc == 0, err
    assert out.splitlines()[0].startswith("study many: 3 of 3 runs to train")
    # a spec's own max_runs: a bigger study of it starts unasked, a smaller limit asks
    monkeypatch.setattr(status, "LARGE_STUDY", 1000)
    assert run_cli(capsys, "study", "run", _seed_spec(tmp_path, 3, "max_runs = 2"), "--out",
                   tmp_path / "o2")[0] == 2
    assert run_cli(capsys, "study", "run", _seed_spec(tmp_path, 1, "max_runs = 2"), "--out",
                   tmp_path / "o2")[0] == 0
    monkeypatch.setattr(status, "LARGE_STUDY", 2)
    rc, out, _ = run_cli(capsys, "study", "run", _seed_spec(tmp_path, 3, "max_runs = 3"), "--out",
                         tmp_path / "o2")
    assert rc == 0 and out.splitlines()[0].startswith("study many: 2 of 3 runs to train")
    assert "max_runs must be" in one_line_error(
        capsys, ["study", "run", _seed_spec(tmp_path, 1, "max_runs = 0")], start=ERROR)


@pytest.mark.parametrize("value", ['"x"', "1.5", "true", "null", "[1]"])
def test_a_config_with_a_wrong_type_is_damaged_like_a_garbage_file(injected_study, tmp_path,
                                                                   capsys, value):
    out = tmp_path / "out"
    shutil.copytree(injected_study, out)
    bad = sorted(p for p in out.iterdir() if (p / "config.json").is_file())[0]
    doc = json.loads((bad / "config.json").read_text())
    doc["config"]["epochs"] = json.loads(value)
    (bad / "config.json").write_text(json.dumps(doc))
    rc, text, err = run_cli(capsys, "runs", "--out", out)
    assert rc == 0 and bad.name not in text and "Traceback" not in err
    assert f"epochs = {value}" in err and "damaged" in err
    rc, text, err = run_cli(capsys, "runs", "--out", out, "--format", "csv")
    assert rc == 0 and bad.name not in text and "damaged" in err
    rc, text, err = run_cli(capsys, "study", "report", out)
    assert rc == 0 and "damaged" in err and "left out of the report" in err
    (bad / "config.json").write_text("[1, 2]")  # garbage: the same treatment, no traceback
    rc, text, err = run_cli(capsys, "runs", "--out", out, "--format", "csv")
    assert rc == 0 and bad.name not in text and "holds no run config" in err


def test_a_folder_without_an_index_says_so_not_damaged(injected_study, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(injected_study, out)
    for p in out.glob("index.sqlite*"):
        p.unlink()
    rc, text, err = run_cli(capsys, "runs", "--out", out)
    assert rc == 0 and len(text.splitlines()) == 4  # header, rule, 2 runs
    assert "no index yet; built from its 2 run folder(s)" in err and "damaged" not in err
    (out / "index.sqlite").write_bytes(b"")  # an emptied file is damage
    assert "was damaged" in run_cli(capsys, "runs", "--out", out)[2]
