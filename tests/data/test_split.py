"""Reproducible, stratified, leakage-aware split that never touches the source."""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.data import split as split_module
from crystalscope.data.split import (assign_splits, parse_ratios, regex_group_key, split_dataset,
                                     split_targets)
from crystalscope.errors import CrystalscopeError


def save(array: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path


def noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """40 distinct CEX crops and 40 distinct PG crops (class folders in upper case)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "source"
    for i in range(40):
        save(noise(rng, 24, 24), root / "CEX" / f"CEX ({i + 1}).png")
        save(noise(rng, 20 + i % 7, 26), root / "PG" / f"PG ({i + 1}).png")
    return root


@pytest.fixture
def grouped_source(tmp_path: Path) -> tuple[Path, list[list[Path]]]:
    """cex: 30 distinct crops; pg: 12 crystals x 3-5 dihedral views (consecutive numbers)."""
    rng = np.random.default_rng(2)
    root = tmp_path / "grouped"
    for i in range(30):
        save(noise(rng, 24, 24), root / "cex" / f"CEX ({i + 1}).png")
    groups, number = [], 1
    for crystal in range(12):
        image = noise(rng, 20 + crystal, 28)
        views = [image, np.rot90(image), image[::-1], np.rot90(image, 2), image[:, ::-1]][: 3 + crystal % 3]
        groups.append([save(v, root / "pg" / f"PG ({number + k}).png") for k, v in enumerate(views)])
        number += len(views)
    return root, groups


def read_rows(out: Path) -> list[dict]:
    with open(out / "split.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_targets_by_largest_remainder():
    assert split_targets(200, (0.7, 0.25, 0.05)) == [140, 50, 10]
    assert split_targets(7, (0.7, 0.25, 0.05)) == [5, 2, 0]
    assert split_targets(0, (0.7, 0.25, 0.05)) == [0, 0, 0]


def test_split_by_file_is_stratified_exact_and_disjoint(source, tmp_path):
    out = tmp_path / "out"
    summary = split_dataset(source, out, group_by="none", progress=False)
    assert summary.counts == {c: {"train": 28, "val": 10, "test": 2} for c in ("cex", "pg")}
    rows = read_rows(out)
    assert list(rows[0]) == ["path", "class", "split", "source", "group"]
    assert len(rows) == 80 and len({r["source"] for r in rows}) == 80
    for row in rows:
        split, class_name, name = row["path"].split("/")
        assert (split, class_name) == (row["split"], row["class"])
        assert (out / row["path"]).read_bytes() == Path(row["source"]).read_bytes()
    on_disk = Counter(p.parent.parent.name for p in out.glob("*/*/*.png"))
    assert on_disk == {"train": 56, "val": 20, "test": 4}
    names = [p.name for p in out.glob("*/*/*.png")]
    assert len(names) == len(set(names))  # no file in two splits


def test_same_seed_same_split_other_seed_differs(source, tmp_path):
    first = split_dataset(source, tmp_path / "a", seed=5, group_by="none", progress=False)
    split_dataset(source, tmp_path / "b", seed=5, group_by="none", progress=False)
    split_dataset(source, tmp_path / "c", seed=6, group_by="none", progress=False)
    a, b, c = (sorted((r["path"], r["split"]) for r in read_rows(tmp_path / n)) for n in "abc")
    assert a == b and a != c
    assert first.seed == 5


def test_kaggle_root_is_detected_and_class_names_lowered(source, tmp_path):
    kaggle = tmp_path / "archive" / "cropped" / "cropped"
    kaggle.parent.mkdir(parents=True)
    source.rename(kaggle)
    summary = split_dataset(tmp_path / "archive", tmp_path / "out", progress=False)
    assert sorted(summary.counts) == ["cex", "pg"]
    assert Path(summary.source) == kaggle
    assert (tmp_path / "out" / "train" / "pg").is_dir()


def test_source_is_untouched(grouped_source, tmp_path):
    root, _ = grouped_source
    (root / "pg" / "readme.txt").write_text("notes")
    before = snapshot(root)
    split_dataset(root, tmp_path / "out", progress=False)
    split_dataset(root, tmp_path / "out2", mode="hardlink", progress=False)
    assert snapshot(root) == before


def test_grouped_split_keeps_every_dihedral_group_in_one_split(grouped_source, tmp_path):
    root, groups = grouped_source
    summary = split_dataset(root, tmp_path / "out", progress=False)
    split_of = {Path(r["source"]).name: r["split"] for r in read_rows(tmp_path / "out")}
    for group in groups:
        assert len({split_of[p.name] for p in group}) == 1, group
    assert summary.groups_kept_together == 12
    assert summary.files_in_groups == sum(map(len, groups))
    pg = summary.counts["pg"]
    targets = split_targets(sum(pg.values()), (0.7, 0.25, 0.05))
    assert all(abs(pg[s] - t) <= 5 for s, t in zip(("train", "val", "test"), targets))
    assert summary.counts["cex"] == {"train": 21, "val": 8, "test": 1}
    groups_in_csv = {r["group"] for r in read_rows(tmp_path / "out") if r["class"] == "pg"}
    assert len(groups_in_csv - {""}) == 12


def test_a_duplicate_filed_under_two_classes_stays_in_one_split(source, tmp_path):
    copy = source / "PG" / "PG (41).png"
    copy.write_bytes((source / "CEX" / "CEX (7).png").read_bytes())
    summary = split_dataset(source, tmp_path / "out", progress=False)
    rows = {Path(r["source"]).name: r for r in read_rows(tmp_path / "out")}
    assert rows["PG (41).png"]["split"] == rows["CEX (7).png"]["split"]
    assert rows["PG (41).png"]["group"] == rows["CEX (7).png"]["group"] != ""
    assert summary.groups_kept_together == 1


def test_split_by_file_leaks_groups(grouped_source, tmp_path):
    root, groups = grouped_source
    split_dataset(root, tmp_path / "out", group_by="none", progress=False)
    split_of = {Path(r["source"]).name: r["split"] for r in read_rows(tmp_path / "out")}
    assert sum(len({split_of[p.name] for p in g}) > 1 for g in groups) >= 3


def test_regex_grouping(tmp_path):
    rng = np.random.default_rng(4)
    for class_name in ("a", "b"):
        for crystal in range(10):
            for view in range(3):
                save(noise(rng, 8, 8), tmp_path / "src" / class_name / f"crystal{crystal}_v{view}.png")
        save(noise(rng, 8, 8), tmp_path / "src" / class_name / "loose.png")
    summary = split_dataset(tmp_path / "src", tmp_path / "out", group_by=r"regex:^(crystal\d+)_",
                            progress=False)
    rows = read_rows(tmp_path / "out")
    for class_name in ("a", "b"):
        for crystal in range(10):
            splits = {r["split"] for r in rows if r["class"] == class_name
                      and r["path"].split("/")[-1].startswith(f"crystal{crystal}_")}
            assert len(splits) == 1
    assert summary.groups_kept_together == 20  # per class: same key in two classes stays separate
    assert regex_group_key(r"v\d")(Path("crystal1_v2.png")) == "re::v2"


def test_custom_group_key_callable(source, tmp_path):
    summary = split_dataset(source, tmp_path / "out", group_by=lambda p: p.parent.name,
                            progress=False)
    assert summary.group_by == "custom"
    assert all(sum(1 for n in c.values() if n) == 1 for c in summary.counts.values())


def test_non_images_and_corrupt_images_are_skipped_and_listed(source, tmp_path):
    (source / "CEX" / "notes.txt").write_text("x")
    (source / "PG" / "PG (99).png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    summary = split_dataset(source, tmp_path / "out", progress=False)
    assert [Path(p).name for p in summary.skipped_non_images] == ["notes.txt"]
    assert len(summary.skipped_unreadable) == 1 and "PG (99).png" in summary.skipped_unreadable[0]
    assert not list((tmp_path / "out").rglob("PG (99).png"))
    assert summary.n_files == 80


def test_force_replaces_and_refusal_without_it(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    for force in (False, True):  # a user's file is never deleted, not even with --force
        with pytest.raises(CrystalscopeError, match="it holds old.txt and no crystalscope manifest.*choose a new"):
            split_dataset(source, out, force=force, progress=False)
    assert (out / "old.txt").read_text() == "old"
    (out / "old.txt").unlink()
    split_dataset(source, out, progress=False)
    with pytest.raises(CrystalscopeError, match="earlier output.*--force"):
        split_dataset(source, out, progress=False)
    split_dataset(source, out, force=True, progress=False)  # an earlier split is ours to replace
    assert (out / "split.csv").exists()


def test_hardlink_and_symlink_modes(source, tmp_path):
    split_dataset(source, tmp_path / "hard", mode="hardlink", group_by="none", progress=False)
    split_dataset(source, tmp_path / "soft", mode="symlink", group_by="none", progress=False)
    for row in read_rows(tmp_path / "hard"):
        assert os.stat(tmp_path / "hard" / row["path"]).st_ino == os.stat(row["source"]).st_ino
    for row in read_rows(tmp_path / "soft"):
        link = tmp_path / "soft" / row["path"]
        assert link.is_symlink() and link.resolve() == Path(row["source"]).resolve()


def test_a_failure_leaves_no_half_written_output(source, tmp_path, monkeypatch):
    calls = []

    def failing_place(job):
        calls.append(job)
        if len(calls) == 10:
            raise CrystalscopeError("disk full")
        return real_place(job)

    real_place = split_module._place
    monkeypatch.setattr(split_module, "_place", failing_place)
    with pytest.raises(CrystalscopeError, match="disk full"):
        split_dataset(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]  # no staging folder left behind


@pytest.mark.parametrize("kwargs, message", [
    ({"ratios": "0.7,0.2,0.2"}, "sum to 1.1, not 1"),
    ({"ratios": "0.7,0.35,-0.05"}, "negative"),
    ({"ratios": "0.7,0.3"}, "three numbers"),
    ({"ratios": "a,b,c"}, "not a list of numbers"),
    ({"mode": "move"}, "--mode 'move' is unknown"),
    ({"group_by": "crystal"}, "--group-by 'crystal' is unknown"),
    ({"group_by": "regex:(["}, "not a valid regular expression"),
])
def test_bad_options_give_one_line_errors(source, tmp_path, kwargs, message):
    with pytest.raises(CrystalscopeError, match=message) as info:
        split_dataset(source, tmp_path / "out", progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_sources_give_one_line_errors(source, tmp_path):
    with pytest.raises(CrystalscopeError, match="does not exist"):
        split_dataset(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "empty" / "cex").mkdir(parents=True)
    with pytest.raises(CrystalscopeError, match="no images found"):
        split_dataset(tmp_path / "empty", tmp_path / "out", progress=False)
    single = tmp_path / "single"
    single.mkdir()
    (source / "CEX").rename(single / "CEX")
    with pytest.raises(CrystalscopeError, match=r"only one class folder \(cex\)"):
        split_dataset(single, tmp_path / "out", progress=False)
    with pytest.raises(CrystalscopeError, match="is inside the input"):
        split_dataset(source, source / "split", progress=False)
    with pytest.raises(CrystalscopeError, match="contains the input"):
        split_dataset(source, tmp_path, force=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_split_folder_is_refused_as_source(source, tmp_path):
    split_dataset(source, tmp_path / "out", progress=False)
    with pytest.raises(CrystalscopeError, match="already looks like a split"):
        split_dataset(tmp_path / "out", tmp_path / "again", progress=False)


def test_parse_ratios_and_assignment_unit():
    assert parse_ratios([0.8, 0.2, 0.0]) == (0.8, 0.2, 0.0)
    files = {"x": [Path(f"{i}.png") for i in range(10)]}
    assignment = assign_splits(files, lambda p: str(p), (0.8, 0.2, 0.0), seed=0)
    assert Counter(assignment.values()) == {"train": 8, "val": 2}


def test_cli_split_smoke(source, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["split", str(source), str(tmp_path / "out"), "--seed", "3", "-q"])
    assert result.exit_code == 0, result.output
    assert "cex" in result.output and "28 (70.0%)" in result.output
    assert "kept together" in result.output
    again = runner.invoke(app, ["split", str(source), str(tmp_path / "out")])
    assert again.exit_code == 2 and "--force" in again.output and "Traceback" not in again.output
    bad = runner.invoke(app, ["split", str(source), str(tmp_path / "x"), "--ratios", "0.5,0.5,0.5"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1


def test_class_folders_that_differ_only_in_case_are_refused(tmp_path):
    from PIL import Image

    from crystalscope.data.split import split_dataset
    from crystalscope.errors import CrystalscopeError

    for folder in ("CEX", "cex", "pg"):
        (tmp_path / "src" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "src" / folder / "a.png")
    with pytest.raises(CrystalscopeError, match="differ only in case"):
        split_dataset(tmp_path / "src", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_regex_that_matches_no_file_name_is_refused(tmp_path):
    rng = np.random.default_rng(5)
    for class_name in ("a", "b"):
        for i in range(4):
            save(noise(rng, 8, 8), tmp_path / "src" / class_name / f"img{i}.png")
    with pytest.raises(CrystalscopeError, match="matches none of the 8 file names"):
        split_dataset(tmp_path / "src", tmp_path / "out", group_by=r"regex:^crystal(\d+)", progress=False)
    assert not (tmp_path / "out").exists()
