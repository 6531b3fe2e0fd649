"""Atomic writes (crystalscope/io.py): all or nothing under the final name, faults name the final path."""

from __future__ import annotations

import errno
import json
import os

import pytest

from crystalscope.errors import OutputError
from crystalscope.formats import MANIFEST_FILE, MANIFEST_FORMAT
from crystalscope.io import (atomic_dir, atomic_path, file_record, foreign_entry, read_manifest, record_files,
                             remove_recorded, write_bytes, write_json, write_text)


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
    assert sorted(p.name for p in final.iterdir()) == ["a.txt", MANIFEST_FILE]
    with atomic_dir(final, force=True) as staging:
        (staging / "d.txt").write_text("4")
    assert sorted(p.name for p in final.iterdir()) == sorted(["d.txt", MANIFEST_FILE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no .partial or .old- left behind


def test_atomic_dir_fault_names_the_final_folder(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(OSError) as caught:
        with atomic_dir(final) as staging:
            raise OSError(errno.EROFS, "Read-only file system", str(staging / "sub" / "x.png"))
    assert caught.value.filename == str(final / "sub" / "x.png")
    assert not final.exists()


def test_atomic_dir_records_every_file_it_wrote_in_its_manifest(tmp_path):
    final = tmp_path / "split"
    with atomic_dir(final, command="split") as staging:
        (staging / "train" / "cex").mkdir(parents=True)
        (staging / "train" / "cex" / "a.png").write_bytes(b"abc")
        (staging / "link.png").symlink_to(tmp_path / "elsewhere.png")
    manifest = read_manifest(final)
    assert manifest["format"] == MANIFEST_FORMAT and manifest["command"] == "split"
    digest = file_record(final / "train/cex/a.png")["sha256"]
    assert manifest["files"]["train/cex/a.png"] == {"size": 3, "sha256": digest}
    assert manifest["files"]["link.png"] == {"symlink": str(tmp_path / "elsewhere.png")}
    assert foreign_entry(final, "split") is None


def test_atomic_dir_never_replaces_a_folder_that_is_not_wholly_ours(tmp_path):
    final = tmp_path / "data"
    (final / "cropped" / "cex").mkdir(parents=True)
    (final / "cropped" / "cex" / "mine.png").write_bytes(b"user")
    with pytest.raises(OutputError, match="no crystalscope manifest"):
        with atomic_dir(final, force=True) as staging:
            (staging / "x.txt").write_text("new")
    assert (final / "cropped" / "cex" / "mine.png").read_bytes() == b"user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_remove_recorded_deletes_only_unchanged_listed_files(tmp_path):
    final = tmp_path / "run"
    with atomic_dir(final) as staging:
        (staging / "weights").mkdir()
        (staging / "weights" / "best.ckpt").write_bytes(b"w")
        (staging / "metrics.csv").write_text("epoch\n")
    (final / "weights" / "notes.txt").write_text("mine")
    (final / "metrics.csv").write_text("edited")
    assert remove_recorded(final) == ["metrics.csv", "weights/notes.txt"]
    assert sorted(str(p.relative_to(final)) for p in final.rglob("*")) == \
        [MANIFEST_FILE, "metrics.csv", "weights", "weights/notes.txt"]
    (final / "metrics.csv").unlink()
    (final / "weights" / "notes.txt").unlink()
    assert remove_recorded(final) == [] and not final.exists()


def test_record_files_adds_in_place_writes_to_the_manifest(tmp_path):
    folder = tmp_path / "monitor"
    folder.mkdir()
    write_text(folder / "timeline.csv", "t\n")
    (folder / "overlay").mkdir()
    write_bytes(folder / "overlay" / "f1.jpg", b"jpg")
    assert "no crystalscope manifest" in foreign_entry(folder)
    record_files(folder, [folder / "timeline.csv", folder / "overlay" / "f1.jpg"], "monitor")
    assert foreign_entry(folder, "monitor") is None
    write_text(folder / "timeline.csv", "t\n1\n")  # rewritten per frame: recorded again
    assert "timeline.csv, which was changed" in foreign_entry(folder)
    record_files(folder, [folder / "timeline.csv"], "monitor")
    assert foreign_entry(folder) is None
    assert sorted(read_manifest(folder)["files"]) == ["overlay/f1.jpg", "timeline.csv"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as staging:
            write_text(staging / "a.txt", "a")
            (staging / "sub").mkdir()
        write_text(tmp_path / "b.txt", "b")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    for path in (tmp_path / "out" / "a.txt", tmp_path / "out" / MANIFEST_FILE, tmp_path / "b.txt"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_writing_through_a_link_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "run3.csv").write_text("old")
    (tmp_path / "latest.csv").symlink_to("run3.csv")
    write_text(tmp_path / "latest.csv", "new")
    assert (tmp_path / "latest.csv").is_symlink() and (tmp_path / "run3.csv").read_text() == "new"
