"""The output rule (crystalscope/safety.py) on its own: inputs, foreign files, force, leftovers, locks.

test_reliability.py checks the same rule through every command; these check the functions.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crystalscope.formats import MANIFEST_FILE
from crystalscope.io import atomic_dir
from crystalscope.safety import (OutputError, check_output, claim_output, clean_stale, describe_os_error, lock_path,
                                 output_lock, report_folder)


def _dead_pid() -> int:
    """The pid of a process that has finished (so no longer runs)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.parametrize("out, how", [("model.onnx", "is"), (".", "contains"), ("imgs/out.csv", "is inside")])
def test_an_output_on_an_input_is_refused(tmp_path, monkeypatch, out, how):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"m")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(OutputError, match=f"--out {out} {how} the input"):
        check_output(out, inputs=[None, "model.onnx", "imgs"])


def _our_report(out, files):
    """A folder as a command writes it: built in staging, committed with its manifest."""
    with atomic_dir(out, command="report") as staging:
        for rel, text in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(text)
    return out


def test_a_folder_is_replaced_only_when_its_manifest_vouches_for_every_file(tmp_path):
    out = _our_report(tmp_path / "report", {"report.csv": "ours", "deep/er/plot.png": "png"})
    assert (out / MANIFEST_FILE).is_file()
    with pytest.raises(OutputError, match="--force"):
        check_output(out, kind="folder", command="report")
    assert check_output(out, kind="folder", command="report", force=True) == out
    (out / "deep" / "er" / "notes.txt").write_text("mine")  # nested: not only top-level names count
    with pytest.raises(OutputError, match=r"holds deep/er/notes.txt, which crystalscope did not write there"):
        check_output(out, kind="folder", command="report", force=True)
    (out / "deep" / "er" / "notes.txt").unlink()
    (out / "deep" / "er" / "plot.png").write_text("edited")
    with pytest.raises(OutputError, match=r"deep/er/plot.png, which was changed"):
        check_output(out, kind="folder", command="report", force=True)
    assert check_output(out, kind="folder", resume=True) == out  # train --resume continues in place


def test_a_folder_without_a_manifest_is_written_only_if_empty(tmp_path):
    out = tmp_path / "data"
    (out / "cropped" / "cex").mkdir(parents=True)  # shaped like our output, but the user's
    assert check_output(out, kind="folder") == out  # only empty folders: nothing to lose, no --force needed
    (out / "cropped" / "cex" / "a.png").write_bytes(b"png")
    with pytest.raises(OutputError, match=f"no crystalscope manifest \\({MANIFEST_FILE}\\).*choose a new folder"):
        check_output(out, kind="folder", command="synth", force=True)


def test_a_folder_another_command_wrote_is_refused(tmp_path):
    out = _our_report(tmp_path / "run", {"weights/best.ckpt": "model"})
    with pytest.raises(OutputError, match="output of `crystalscope report`, not of `evaluate`"):
        check_output(out, kind="folder", command="evaluate", force=True)


@pytest.mark.parametrize("kind", ["device", "fifo", "link to device"])
def test_a_file_output_that_is_not_a_plain_file_is_refused(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "link to device":
        target.symlink_to(os.devnull)
    else:
        target = Path(os.devnull)
    with pytest.raises(OutputError, match="is not a regular file"):
        check_output(target, inputs=[], kind="file")
    assert not Path(os.devnull).is_file()


def test_files_and_folders_in_the_wrong_place_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(OutputError, match="is a folder"):
        check_output(tmp_path, kind="file")
    with pytest.raises(OutputError, match="is a file: give a folder"):
        check_output(tmp_path / "a.txt", kind="folder")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output(tmp_path / "a.txt" / "out.csv", option="--sheet")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="current folder"):
        check_output(tmp_path.parent, kind="folder", force=True)


def test_clean_stale_removes_only_dead_writers_leftovers(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".x.png.{dead}.ab12.tmp").write_text("half")
    (tmp_path / f".run.{dead}.cd34.partial").mkdir()
    (tmp_path / f".run.old-{dead}").mkdir()
    live = tmp_path / f".y.png.{os.getpid()}.ef56.tmp"
    live.write_text("being written")
    (tmp_path / ".hidden.tmp").write_text("not ours")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f".z.{dead}.gh78.tmp").write_text("half")
    removed = clean_stale(tmp_path, recursive=True)
    assert len(removed) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, ".hidden.tmp", "sub"])
    assert list((tmp_path / "sub").iterdir()) == [] and clean_stale(tmp_path / "missing") == []


def test_one_writer_per_output_and_dead_locks_are_taken_over(tmp_path):
    out = tmp_path / "p.csv"
    lock_path(out).write_text(str(_dead_pid()))
    with output_lock(out) as lock:
        assert lock.read_text() == str(os.getpid())
        lock.write_text("1")  # pid 1 always runs: a second writer must be refused
        with pytest.raises(OutputError, match="another crystalscope process"):
            with output_lock(out):
                pass
        lock.write_text(str(os.getpid()))
    assert not lock_path(out).exists()


def test_claim_and_report_folder_write_all_or_nothing(tmp_path):
    with claim_output(tmp_path / "x.csv") as path:
        path.write_text("a")
        assert lock_path(path).exists()
    assert not lock_path(path).exists()
    out = tmp_path / "report"
    with report_folder(out, command="r") as staging:
        (staging / "r.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with report_folder(out, command="r", force=True) as staging:
            (staging / "r.txt").write_text("2")
            raise RuntimeError("crash")
    assert (out / "r.txt").read_text() == "1"
    with report_folder(out, command="r", force=True) as staging:
        (staging / "s.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "s.txt"]


def test_describe_os_error_names_the_cause_and_the_path():
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system", "/mnt/x")) == \
        "read-only file system: cannot write /mnt/x; choose a writable --out"
    assert describe_os_error(OSError(errno.ENOENT, "No such file", "a.png")) == "a.png: no such file or folder"
    assert describe_os_error(OSError(errno.EIO, "Input/output error", None)) == "a file: Input/output error"
