"""Image folders are read as a whole (RGB, one size or an explicit resize, two classes at
least), and a run's identity includes its data: a run folder is never resumed, nor taken as
done by a study, with data other than the data it was trained on."""

from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest
from conftest import write_cifar, write_image_folder
from helpers import run_cli
from PIL import Image

from bnlab.config import load
from bnlab.data import fingerprint, load_data
from bnlab.store import Store
from bnlab.train import train_run

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(_line: str) -> None:
    pass


def test_grey_first_image_does_not_make_the_dataset_one_channel(tmp_path):
    pixels = write_image_folder(tmp_path / "f", size=8)
    first = sorted(p for p in pixels if "/train/" in p)[0]
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey, mode="L").save(first)
    b = load_data(f"imagefolder:{tmp_path / 'f'}")
    assert b.in_channels == 3 and b.train.x.shape[1:] == (3, 8, 8)
    for c in range(3):  # the grey image is the same in every channel
        assert np.array_equal(b.train.x[0, c].numpy(), grey)
    second = sorted(p for p in pixels if "/train/" in p)[1]
    assert np.array_equal(b.train.x[1].permute(1, 2, 0).numpy(), pixels[second])


def test_small_images_of_another_size_are_refused_naming_the_file(tmp_path, capsys):
    pixels = write_image_folder(tmp_path / "f", size=16)
    odd = sorted(p for p in pixels if "/val/" in p)[2]
    Image.fromarray(np.zeros((60, 17, 3), np.uint8)).save(odd)
    rc, _, err = run_cli(capsys, "train", "--dataset", f"imagefolder:{tmp_path / 'f'}",
                         "--out", tmp_path / "o")
    assert rc == 2 and odd in err and "17x60" in err and "--image-size" in err
    assert len(err.strip().splitlines()) == 1


def test_image_size_resizes_every_small_image(tmp_path):
    pixels = write_image_folder(tmp_path / "f", size=16)
    odd = sorted(p for p in pixels if "/train/" in p)[0]
    Image.fromarray(np.full((60, 17, 3), 200, np.uint8)).save(odd)
    b = load_data(f"imagefolder:{tmp_path / 'f'}", image_size=12)
    assert b.train.x.shape[1:] == (3, 12, 12) and b.image_size == 12
    assert (b.train.x[0] == 200).all()  # a constant image stays constant when resized
    ref = np.asarray(Image.fromarray(pixels[sorted(p for p in pixels if "/train/" in p)[1]])
                     .resize((12, 12), Image.BILINEAR))
    assert np.array_equal(b.train.x[1].permute(1, 2, 0).numpy(), ref)


def test_fewer_than_two_classes_is_refused(tmp_path, capsys):
    write_image_folder(tmp_path / "f", classes=("only",))
    rc, _, err = run_cli(capsys, "train", "--dataset", f"imagefolder:{tmp_path / 'f'}",
                         "--out", tmp_path / "o")
    assert rc == 2 and "at least 2" in err and "'only'" not in err.split("(")[0]


def test_fingerprint_follows_the_data_not_its_place(tmp_path):
    write_image_folder(tmp_path / "a", size=8)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    write_image_folder(tmp_path / "b", size=8, seed=1)
    fa, fc, fb = (fingerprint(f"imagefolder:{tmp_path / d}") for d in ("a", "copy", "b"))
    assert fa == fc != fb
    assert fa == load_data(f"imagefolder:{tmp_path / 'a'}").fingerprint
    write_cifar(tmp_path / "c1")
    write_cifar(tmp_path / "c2", seed=5)
    shutil.copytree(tmp_path / "c1", tmp_path / "c3")
    f1, f2, f3 = (fingerprint("cifar10", tmp_path / d) for d in ("c1", "c2", "c3"))
    assert f1 == f3 != f2
    assert f1 == load_data("cifar10", tmp_path / "c1").fingerprint


def _cifar_cfg(data_dir, **kw):
    return load(overrides={**dict(dataset="cifar10", data_dir=str(data_dir), model="mlp3x100",
                                  batch_size=16, epochs=1, device="cpu", cpu_kernels=False,
                                  augment=False), **kw})


def test_resume_with_other_data_is_refused(tmp_path, capsys):
    write_cifar(tmp_path / "d1")
    write_cifar(tmp_path / "d2", seed=3)
    c1, c2 = _cifar_cfg(tmp_path / "d1"), _cifar_cfg(tmp_path / "d2")
    assert c1.run_id() == c2.run_id()  # --data-dir is not part of the id, so the data is checked
    train_run(c1, tmp_path / "o", log=quiet)
    argv = ["train", "--dataset", "cifar10", "--data-dir", tmp_path / "d2", "--model",
            "mlp3x100", "--batch-size", "16", "--epochs", "1", "--device", "cpu",
            "--no-cpu-kernels", "--no-augment", "--out", tmp_path / "o", "--resume"]
    rc, _, err = run_cli(capsys, *argv)  # finished: not returned as the result on d2
    assert rc == 2 and "trained on other data" in err
    run = Store(tmp_path / "o").run(c1.run_id())
    run.write_json("summary.json", {**run.summary, "status": "running"})
    rc, _, err = run_cli(capsys, *argv)  # interrupted: not continued on d2
    assert rc == 2 and "trained on other data" in err and str(tmp_path / "o") in err
    shutil.copytree(tmp_path / "d1", tmp_path / "d1copy")  # the same data elsewhere is fine
    s = train_run(_cifar_cfg(tmp_path / "d1copy"), tmp_path / "o", resume=True, log=quiet)
    assert s["status"] != "failed"


def _cifar_spec(tmp_path, epochs: int, extra: str = ""):
    """A one-run study of the MLP on the cifar10 files of --set data_dir, at tmp_path/spec.toml."""
    spec = tmp_path / "spec.toml"
    spec.write_text(textwrap.dedent(f"""
        name = "data"
        [base]
        dataset = "cifar10"
        model = "mlp3x100"
        batch_size = 16
        epochs = {epochs}
        device = "cpu"
        cpu_kernels = false
        {extra}
        [grid]
        seed = [0]
        """))
    return spec


def test_study_does_not_take_a_run_on_other_data_as_done(tmp_path, capsys):
    write_cifar(tmp_path / "d1")
    write_cifar(tmp_path / "d2", seed=3)
    spec = _cifar_spec(tmp_path, epochs=1)
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "study", "run", spec, "--out", out, "--set",
                         f"data_dir={tmp_path / 'd1'}")
    assert rc == 0, err
    rc, text, err = run_cli(capsys, "study", "run", spec, "--out", out, "--set",
                            f"data_dir={tmp_path / 'd2'}")
    assert rc == 2 and "trained on other data" in err and "1 already finished" not in text
    run = Store(out).runs()[0]
    assert run.summary["status"] in ("completed", "no_learning")  # the first result kept
    rc, _, err = run_cli(capsys, "study", "run", spec, "--out", out, "--set",
                         f"data_dir={tmp_path / 'd1'}")
    assert rc == 0, err


def test_parallel_study_stops_on_a_run_with_other_data(tmp_path, capsys):
    """The check in a worker process (--jobs 2) reaches the runner as its one line."""
    write_cifar(tmp_path / "d1")
    write_cifar(tmp_path / "d2", seed=3)
    c = _cifar_cfg(tmp_path / "d1", epochs=2, seed=0)
    train_run(_cifar_cfg(tmp_path / "d1", epochs=2, seed=0), tmp_path / "o", log=quiet)
    run = Store(tmp_path / "o").run(c.run_id())
    run.write_json("summary.json", {**run.summary, "status": "running"})  # interrupted
    spec = _cifar_spec(tmp_path, epochs=2, extra="augment = false")
    rc, _, err = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o", "--jobs", "2",
                         "--set", f"data_dir={tmp_path / 'd2'}")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "trained on other data" in lines[0], err
    assert run.summary["status"] == "running"  # not recorded as failed
