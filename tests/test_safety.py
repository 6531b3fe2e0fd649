"""The output rule (crystalscope/safety.py) on its own: inputs, foreign files, force, leftovers, locks.

test_reliability.py checks the same rule through every command; these check the functions.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

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


def test_a_folder_with_foreign_files_is_never_replaced(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.csv").write_text("ours")
    with pytest.raises(OutputError, match="--force"):
        check_output(out, kind="folder", owned=["report.csv"])
    assert check_output(out, kind="folder", owned=["*.csv"], force=True) == out
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write there \(notes.txt\)"):
        check_output(out, kind="folder", owned=["report.csv"], force=True)
    assert check_output(out, kind="folder", resume=True) == out  # train --resume continues in place


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
    with report_folder(out, owned=["r.txt"]) as staging:
        (staging / "r.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with report_folder(out, owned=["r.txt"], force=True) as staging:
            (staging / "r.txt").write_text("2")
            raise RuntimeError("crash")
    assert (out / "r.txt").read_text() == "1"


def test_describe_os_error_names_the_cause_and_the_path():
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system", "/mnt/x")) == \
        "read-only file system: cannot write /mnt/x; choose a writable --out"
    assert describe_os_error(OSError(errno.ENOENT, "No such file", "a.png")) == "a.png: no such file or folder"
    assert describe_os_error(OSError(errno.EIO, "Input/output error", None)) == "a file: Input/output error"
