"""Atomic writes (crystalscope/io.py): all or nothing under the final name, faults name the final path."""

from __future__ import annotations

import errno
import json
import os

import pytest

from crystalscope.io import atomic_dir, atomic_path, write_bytes, write_json, write_text


def test_write_helpers_create_parents_and_leave_no_staging_file(tmp_path):
    text = write_text(tmp_path / "a" / "b" / "note.txt", "héllo\n")
    data = write_bytes(tmp_path / "a" / "blob.bin", b"\x00\x01")
    doc = write_json(tmp_path / "a" / "doc.json", {"k": [1, 2]})
    assert text.read_text(encoding="utf-8") == "héllo\n" and data.read_bytes() == b"\x00\x01"
    assert json.loads(doc.read_text()) == {"k": [1, 2]} and doc.read_text().endswith("\n")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b", "blob.bin", "doc.json"]


def test_written_files_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file_and_removes_the_staging_file(tmp_path):
    final = write_text(tmp_path / "keep.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert final.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_an_os_error_names_the_final_path_not_the_staging_one(tmp_path):
    final = tmp_path / "report.txt"
    with pytest.raises(OSError) as caught:
        with atomic_path(final):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".report.txt.1.x.tmp"))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(final)


def test_atomic_dir_swaps_in_a_complete_folder_only(tmp_path):
    final = tmp_path / "report"
    with atomic_dir(final) as staging:
        (staging / "a.txt").write_text("1")
        assert not final.exists()  # nothing under the final name until the body finishes
    assert (final / "a.txt").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_dir(final) as staging:
            (staging / "b.txt").write_text("2")
    with pytest.raises(ValueError):
        with atomic_dir(final, force=True) as staging:
            (staging / "c.txt").write_text("3")
            raise ValueError("half-built")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    with atomic_dir(final, force=True) as staging:
        (staging / "d.txt").write_text("4")
    assert sorted(p.name for p in final.iterdir()) == ["d.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no .partial or .old- left behind


def test_atomic_dir_fault_names_the_final_folder(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(OSError) as caught:
        with atomic_dir(final) as staging:
            raise OSError(errno.EROFS, "Read-only file system", str(staging / "sub" / "x.png"))
    assert caught.value.filename == str(final / "sub" / "x.png")
    assert not final.exists()
