"""Damaged stores and file-system faults: the run folders are the truth and the index heals;
torn, garbage and corrupt run files resume or restart; a full disk, a read-only folder or a
file where a folder should be ends in one line, exit code 2, with nothing half-written and the
run resumable."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import run_cli

from bnlab import cli
from bnlab.config import load
from bnlab.errors import StorageError, UserError
from bnlab.store import Store
from bnlab.study.worker import run_one
from bnlab.train import train_run

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"epoch_time", "train_images_per_s"}
TINY = ["--dataset", "synthetic", "--model", "mlp3x100", "--limit-train", "64",
        "--limit-test", "64", "--batch-size", "32", "--epochs", "2", "--device", "cpu",
        "--no-cpu-kernels"]
SPEC = """
name = "tiny"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 64
limit_test = 64
batch_size = 32
epochs = 2
device = "cpu"
cpu_kernels = false
[grid]
norm = ["bn", "none"]
seed = [0, 1]
"""

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnlab: error: "), err
    return lines[0]


def cfg(**kw):
    base = dict(dataset="synthetic", model="mlp3x100", limit_train=64, limit_test=64,
                batch_size=32, epochs=2, device="cpu", cpu_kernels=False)
    return load(overrides={**base, **kw})


def quiet(_line: str) -> None:
    pass


def rows_without_timing(run) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in run.metrics()]


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A finished 4-run study, trained once for the module; tests copy it."""
    root = tmp_path_factory.mktemp("study")
    (root / "spec.toml").write_text(textwrap.dedent(SPEC))
    assert cli.main(["study", "run", str(root / "spec.toml"), "--out", str(root / "out")]) == 0
    return root / "out"


def copy_of(study: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(study, out)
    return out


def run_ids(out: Path) -> list[str]:
    return sorted(r["run_id"] for r in json.loads((out / "study.json").read_text())["runs"])


# -- the index heals ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["random bytes", "truncated to zero", "deleted"])
def test_destroyed_index_is_rebuilt_and_every_finished_run_listed(finished_study, tmp_path,
                                                                  capsys, damage):
    out = copy_of(finished_study, tmp_path)
    index = out / "index.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    if damage == "random bytes":
        index.write_bytes(os.urandom(8192))
    elif damage == "truncated to zero":
        index.write_bytes(b"")
    else:
        index.unlink()
    rc, text, err = run_cli(capsys, "runs", "--out", out)
    assert rc == 0, err
    listed = sorted(line.split()[0] for line in text.splitlines()[2:])
    assert listed == run_ids(out)
    assert "warning" in err and "Traceback" not in err
    assert sorted(r["run_id"] for r in Store(out).rows()) == run_ids(out)  # healed on disk
    if damage == "random bytes":
        assert (out / "index.sqlite.damaged").is_file()


def test_index_without_its_wal_file_is_completed_from_the_folders(finished_study, tmp_path,
                                                                  capsys):
    """A copy of OUT taken without index.sqlite-wal lacks the rows the WAL held."""
    src = copy_of(finished_study, tmp_path / "a")
    keep = sqlite3.connect(src / "index.sqlite")  # an open reader keeps SQLite from
    keep.execute("SELECT count(*) FROM runs").fetchone()  # folding the WAL in on close
    store = Store(src)
    for rid in run_ids(src):
        store.record(store.run(rid))  # fresh rows, in the WAL
    assert Path(f"{src}/index.sqlite-wal").stat().st_size > 0
    out = tmp_path / "b"
    shutil.copytree(src, out, ignore=lambda d, names: [n for n in names if n.endswith("-wal")])
    keep.close()
    with sqlite3.connect(out / "index.sqlite") as db:
        db.execute("DELETE FROM runs WHERE run_id = ?", (run_ids(out)[0],))  # a lost row
        db.execute("UPDATE runs SET status = 'running'")  # stale rows
    rc, text, err = run_cli(capsys, "runs", "--out", out)
    assert rc == 0 and "lacked 1 run folder(s) and was out of date for 3" in err
    assert sorted(line.split()[0] for line in text.splitlines()[2:]) == run_ids(out)
    assert "running" not in text
    assert {r["status"] for r in Store(out).rows()} <= {"completed", "no_learning", "diverged"}


def test_rebuild_index_flag_keeps_the_damaged_file(finished_study, tmp_path, capsys):
    out = copy_of(finished_study, tmp_path)
    (out / "index.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    for suffix in ("-wal", "-shm"):
        Path(f"{out}/index.sqlite{suffix}").unlink(missing_ok=True)
    rc, text, err = run_cli(capsys, "runs", "--out", out, "--rebuild-index")
    assert rc == 0, err
    assert "from 4 run folders" in text.splitlines()[0]
    assert (out / "index.sqlite.damaged").is_file()


def test_run_ids_from_an_index_or_study_file_stay_inside_out(finished_study, tmp_path, capsys):
    out = copy_of(finished_study, tmp_path)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "summary.json").write_text('{"status": "completed"}')
    with sqlite3.connect(out / "index.sqlite") as db:
        db.execute("INSERT INTO runs (run_id, path, status, config, updated) "
                   "VALUES ('../secret', '../secret', 'completed', '{}', 0)")
    assert "../secret" not in [r["run_id"] for r in Store(out).rows()]
    with pytest.raises(UserError, match="not a plain folder name"):
        Store(out).run("../secret")
    doc = json.loads((out / "study.json").read_text())
    doc["runs"][0]["run_id"] = "../secret"
    (out / "study.json").write_text(json.dumps(doc))
    rc, _, err = run_cli(capsys, "study", "report", out)
    assert rc == 2 and "not a plain folder name" in error_line(err)


# -- torn, garbage and corrupt run files ---------------------------------------------------
def test_torn_metrics_line_and_garbage_summary_do_not_stop_report_or_resume(
        finished_study, tmp_path, capsys):
    out = copy_of(finished_study, tmp_path)
    ids = run_ids(out)
    torn, garbage = out / ids[0], out / ids[1]
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "test_acc": 0.')  # a crash mid-line
    (garbage / "summary.json").write_bytes(b"\x00\x17garbage{")
    rc, text, err = run_cli(capsys, "study", "report", out, "--report-dir", tmp_path / "rep")
    assert rc == 0, err
    assert "line 3" in err and "summary.json" in err and "Traceback" not in err
    assert (tmp_path / "rep" / "report.md").is_file()
    rc, text, err = run_cli(capsys, "study", "status", out)
    assert rc == 0 and "interrupted" in text
    # the runner resumes the run whose summary was garbage from its checkpoint (epoch 2 of 2)
    rc, text, err = run_cli(capsys, "study", "run", _spec(tmp_path), "--out", out)
    assert rc == 0, err
    assert Store(out).run(ids[1]).summary["status"] in ("completed", "no_learning")
    assert f"{ids[1]}: resuming" in text
    assert f"{ids[0]}: " not in text.replace(f"{ids[0]}: completed", "")  # left alone


def _spec(tmp_path: Path) -> Path:
    p = tmp_path / "spec.toml"
    p.write_text(textwrap.dedent(SPEC))
    return p


def test_corrupt_checkpoint_in_a_study_restarts_the_run_from_scratch(tmp_path, capsys):
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    c = cfg(norm="bn", seed=0)
    reference = train_run(c, tmp_path / "ref", log=quiet)
    train_run(cfg(norm="bn", seed=0, epochs=2), out, log=quiet)  # the study's first run ...
    run = Store(out).run(c.run_id())
    summary = run.summary
    summary["status"] = "running"  # ... as if killed after its last checkpoint
    run.write_json("summary.json", summary)
    run.checkpoint_path.write_bytes(run.checkpoint_path.read_bytes()[:1000])  # torn zip
    for _ in range(2):  # a second study run leaves it finished, not failed for ever
        rc, text, err = run_cli(capsys, "study", "run", spec, "--out", out)
        assert rc == 0, err
    s = Store(out).run(c.run_id()).summary
    assert s["status"] == reference["status"] and "restarted" in s
    assert "checkpoint.pt.damaged" in s["restarted"]
    assert (run.path / "checkpoint.pt.damaged").is_file()
    assert rows_without_timing(run) == rows_without_timing(Store(tmp_path / "ref").run(
        c.run_id()))  # trained again from scratch: the same epochs as a clean run


def test_garbage_config_json_is_written_again_at_resume(tmp_path):
    c = cfg(epochs=2)
    train_run(cfg(epochs=2), tmp_path / "o", log=quiet)
    run = Store(tmp_path / "o").run(c.run_id())
    s = run.summary
    s["status"] = "running"
    run.write_json("summary.json", s)
    (run.path / "config.json").write_text("{not json")
    assert train_run(c, tmp_path / "o", resume=True, log=quiet)["status"] != "failed"
    assert run.config["seed"] == 0


# -- file-system faults ------------------------------------------------------------------------
class DiskFull:
    """Make the `nth` fsync of a file whose name contains `name` fail with ENOSPC, as a full
    disk does: every store write goes write -> fsync -> rename."""

    def __init__(self, monkeypatch, name: str, nth: int = 1):
        self.name, self.left, self.real = name, nth, os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd):
        if self.name in os.readlink(f"/proc/self/fd/{fd}"):
            self.left -= 1
            if self.left == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd)


def test_disk_full_during_a_run_is_one_line_and_the_run_resumes(tmp_path, capsys,
                                                                  monkeypatch):
    clean = tmp_path / "clean"
    assert cli.main(["train", *TINY, "--out", str(clean)]) == 0
    capsys.readouterr()
    full = DiskFull(monkeypatch, ".checkpoint.pt.", nth=2)  # epoch 2's checkpoint
    rc, _, err = run_cli(capsys, "train", *TINY, "--out", tmp_path / "o")
    line = error_line(err)
    assert rc == 2 and "checkpoint.pt" in line and "No space left on device" in line
    monkeypatch.setattr(os, "fsync", full.real)
    run_id = cfg().run_id()
    run = Store(tmp_path / "o").run(run_id)
    assert run.summary["status"] == "running" and run.summary["epochs_done"] == 1
    assert not list(run.path.glob(".*.tmp"))  # nothing half-written left behind
    rc, _, err = run_cli(capsys, "train", *TINY, "--out", tmp_path / "o", "--resume")
    assert rc == 0, err
    assert rows_without_timing(run) == rows_without_timing(Store(clean).run(run_id))


def test_disk_full_in_a_study_stops_it_without_failing_runs(tmp_path, capsys, monkeypatch):
    spec = _spec(tmp_path)
    full = DiskFull(monkeypatch, "summary.json", nth=3)
    rc, _, err = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o")
    assert rc == 2 and "No space left on device" in error_line(err)
    monkeypatch.setattr(os, "fsync", full.real)
    statuses = [Store(tmp_path / "o").run(r).summary for r in run_ids(tmp_path / "o")]
    assert all((s or {}).get("status") != "failed" for s in statuses)
    rc, _, err = run_cli(capsys, "study", "run", spec, "--out", tmp_path / "o")
    assert rc == 0, err


def test_full_index_is_one_line(tmp_path, monkeypatch):
    """SQLite's own 'database or disk is full', made real by capping the index's pages."""
    store = Store(tmp_path / "o")
    real = Store._connect

    def capped(self):
        db = real(self)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
        return db

    monkeypatch.setattr(Store, "_connect", capped)
    with pytest.raises(StorageError, match="index.sqlite.*full"):
        for i in range(200):
            store.record_attempt(f"run{i}" + "x" * 2000, 0)


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("mine")
    for out in (f, f / "sub"):
        rc, _, err = run_cli(capsys, "train", *TINY, "--out", out)
        assert rc == 2 and "is a file, not a folder" in error_line(err)
    assert f.read_text() == "mine"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_output_folder_is_one_line(tmp_path, capsys, monkeypatch, code):
    """Tests run as root, whom chmod does not stop: the file system's answer is injected
    where every store write starts (the temporary file)."""
    import tempfile

    real = tempfile.mkstemp

    def refuse(*a, **kw):
        if str(tmp_path / "o") in str(kw.get("dir", "")):
            raise OSError(code, os.strerror(code), str(kw["dir"]))
        return real(*a, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    rc, _, err = run_cli(capsys, "train", *TINY, "--out", tmp_path / "o")
    assert rc == 2 and os.strerror(code) in error_line(err)


def test_cache_folder_that_cannot_be_used_is_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "cachefile"
    blocker.write_text("")
    monkeypatch.setenv("BNLAB_CACHE", str(blocker / "bnlab"))
    from conftest import write_image_folder

    write_image_folder(tmp_path / "imgs")
    rc, _, err = run_cli(capsys, "train", "--dataset", f"imagefolder:{tmp_path / 'imgs'}",
                         "--out", tmp_path / "o")
    line = error_line(err)
    assert rc == 2 and "cache folder" in line and "BNLAB_CACHE" in line


def test_finished_study_on_read_only_storage_is_listed_and_reported(finished_study, tmp_path,
                                                                     capsys, monkeypatch):
    out = copy_of(finished_study, tmp_path)
    real_access = os.access

    def read_only(path, mode, *a, **kw):  # root ignores chmod: the folder says "read-only"
        if str(path).startswith(str(out)) and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", read_only)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    rc, text, err = run_cli(capsys, "runs", "--out", out)
    assert rc == 0 and sorted(line.split()[0] for line in text.splitlines()[2:]) == run_ids(out)
    rc, text, err = run_cli(capsys, "study", "status", out)
    assert rc == 0, err
    rc, text, err = run_cli(capsys, "study", "report", out, "--report-dir", tmp_path / "rep")
    assert rc == 0 and (tmp_path / "rep" / "report.html").is_file(), err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written


def test_broken_pipe_exits_quietly(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "bnlab", "norms"], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # `| head -0`: the reader is gone before the first line
    err = p.stderr.read().decode()
    p.wait()
    assert err == "" and p.returncode == 141


def test_worker_never_trains_a_run_of_an_unreadable_index(tmp_path):
    """A study's unit of work on an index of random bytes: healed, then trained."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "index.sqlite").write_bytes(os.urandom(4096))
    s = run_one(cfg(), out, log=quiet)
    assert s["status"] in ("completed", "no_learning")
    assert [r["run_id"] for r in Store(out).rows()] == [cfg().run_id()]


# -- shared CPUs and shared output streams -------------------------------------------------
def test_train_lets_openmp_sleep_on_a_shared_cpu(tmp_path, monkeypatch):
    """`bnlab train` asks for the same OpenMP wait policy as `study run` when the CPU is
    shared (and leaves it alone on a CPU of its own)."""
    for shared, want in ((False, None), (True, "PASSIVE")):
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.setattr(cli.commands, "cpu_shared", lambda jobs, s=shared: s)
        assert cli.main(["train", *TINY, "--out", str(tmp_path / str(shared))]) == 0
        assert os.environ.get("OMP_WAIT_POLICY") == want


def test_progress_writes_each_line_in_one_write():
    """print() writes a line and its newline separately; a worker process writing to the same
    pipe in between split 'RUN: starting' lines (what made the two-runner test fail under
    load). Each line must reach the stream whole."""
    from bnlab.study.progress import Progress

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

        def flush(self):
            pass

        def isatty(self):
            return False

    rec = Recorder()
    p = Progress.__new__(Progress)
    p.stream, p.tty, p.shown, p.out, p.bar = rec, False, False, rec, None
    import threading

    p.lock = threading.Lock()
    p.log("mlp3x100-bn-synthetic-s0-1234abcd: starting")
    assert rec.writes == ["mlp3x100-bn-synthetic-s0-1234abcd: starting\n"]


def test_index_deleted_while_a_run_trains_is_rebuilt_not_fatal(tmp_path):
    c = cfg(epochs=2)
    store = Store(tmp_path / "o")
    train_run(c, tmp_path / "o", log=quiet)
    (tmp_path / "o" / "index.sqlite").unlink()  # between two writes of a running run
    for suffix in ("-wal", "-shm"):
        Path(f"{tmp_path}/o/index.sqlite{suffix}").unlink(missing_ok=True)
    store.record(store.run(c.run_id()))  # the next write heals instead of failing
    assert [r["run_id"] for r in store.rows()] == [c.run_id()]


@pytest.mark.parametrize("doc", ['{"name": "tiny"}', '[1, 2]', '{"runs": [{"values": {}}]}',
                                 '{"runs": "x"}', '{"runs": [], "axes": 5'])
def test_damaged_study_json_is_one_line_for_status_and_report(finished_study, tmp_path,
                                                              capsys, doc):
    out = copy_of(finished_study, tmp_path)
    (out / "study.json").write_text(doc)
    for action in ("status", "report"):
        rc, _, err = run_cli(capsys, "study", action, out)
        assert rc == 2 and "study.json" in error_line(err)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--config", "{d}"], "is a folder, not a TOML file"),
    (["train", "--dataset", "mnist", "--data-dir", "{f}"], "is a file, not a folder"),
    (["train", "--dataset", "imagefolder:{f}"], "neither a folder nor a .tar"),
    (["runs", "--out", "{f}"], "not a bnlab output folder"),
    (["runs", "--out", "{d}/missing"], "not a bnlab output folder"),
    (["study", "report", "{d}"], "no study.json"),
])
def test_paths_of_the_wrong_kind_are_one_line(tmp_path, capsys, argv, needle):
    (tmp_path / "f").write_text("")
    rc, _, err = run_cli(capsys, *[a.format(d=tmp_path, f=tmp_path / "f") for a in argv])
    assert rc == 2 and needle in error_line(err)
