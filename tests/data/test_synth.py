"""Tests for the synthetic CEX/PG generator (crystalscope.data.synth) and `crystalscope synth`."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from crystalscope.formats import MANIFEST_FILE
from PIL import Image
from typer.testing import CliRunner

from crystalscope.cli import app
from crystalscope.data import synth
from crystalscope.errors import CrystalscopeError

PER_CLASS = 14


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """A small realistic set written in-process (workers=1)."""
    root = tmp_path_factory.mktemp("synth") / "set"
    synth.generate(root, per_class=PER_CLASS, seed=5, workers=1, progress=False)
    return root


def _manifest(root: Path) -> list[dict]:
    with open(root / "synth_manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _numbers(folder: Path, prefix: str) -> list[int]:
    names = [p.name for p in folder.iterdir()]
    pattern = re.compile(rf"^{prefix} \((\d+)\)\.png$")
    assert all(pattern.match(n) for n in names), names
    return sorted(int(pattern.match(n).group(1)) for n in names)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_kaggle_layout_names_and_exact_counts(small_set):
    kaggle = small_set / "cropped" / "cropped"
    assert sorted(p.name for p in kaggle.iterdir()) == ["cex", "pg"]
    assert _numbers(kaggle / "cex", "CEX") == list(range(1, PER_CLASS + 1))
    assert _numbers(kaggle / "pg", "PG") == list(range(1, PER_CLASS + 1))
    # the manifest sits outside cropped/cropped so a split of the Kaggle root never sees it
    assert sorted(p.name for p in small_set.iterdir()) == sorted(["cropped", "synth_manifest.csv", MANIFEST_FILE])
    rows = _manifest(small_set)
    assert list(rows[0]) == ["path", "class", "crystal_id", "view"]
    assert sorted(r["path"] for r in rows) == sorted(
        p.relative_to(small_set).as_posix() for p in kaggle.rglob("*.png"))
    assert {r["class"] for r in rows} == {"cex", "pg"}


def test_cex_crops_are_151_square_grey_rgb(small_set):
    for path in (small_set / "cropped" / "cropped" / "cex").iterdir():
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (151, 151), path
            pixels = np.asarray(img)
        # grey-looking like the real crops: the three channels are equal
        assert np.array_equal(pixels[..., 0], pixels[..., 1])
        assert np.array_equal(pixels[..., 0], pixels[..., 2])
        assert pixels.std() > 10, f"{path} is nearly flat"


def test_pg_sizes_vary_within_real_range(small_set):
    sizes = []
    for path in (small_set / "cropped" / "cropped" / "pg").iterdir():
        with Image.open(path) as img:
            assert img.mode == "RGB"
            sizes.append(img.size)
    assert all(130 <= side <= 230 for size in sizes for side in size), sizes
    assert len(set(sizes)) >= 3
    assert any(w != h for w, h in sizes)


def test_pg_groups_are_pixel_exact_dihedral_views(small_set):
    groups = defaultdict(list)
    for row in _manifest(small_set):
        if row["class"] == "pg":
            groups[row["crystal_id"]].append(row)
    assert len(groups) >= 3
    number = lambda row: int(re.search(r"\((\d+)\)", row["path"]).group(1))  # noqa: E731
    for index, members in enumerate(sorted(groups.values(), key=lambda g: number(g[0]))):
        numbers = [number(r) for r in members]
        assert numbers == list(range(numbers[0], numbers[0] + len(members)))  # consecutive
        views = [r["view"] for r in members]
        assert views[0] == "identity" and len(set(views)) == len(views)
        is_last = index == len(groups) - 1
        assert 3 <= len(members) <= 5 or (is_last and len(members) < 3), views
        arrays = [np.asarray(Image.open(small_set / r["path"])) for r in members]
        for view, array in zip(views, arrays):
            assert np.array_equal(array, synth.DIHEDRAL_VIEWS[view](arrays[0])), (members[0], view)
        # distinct views of a non-symmetric crystal are distinct images
        for i in range(len(arrays)):
            for j in range(i + 1, len(arrays)):
                assert arrays[i].shape != arrays[j].shape or not np.array_equal(arrays[i], arrays[j])


def test_cex_crops_are_single_views(small_set):
    cex = [r for r in _manifest(small_set) if r["class"] == "cex"]
    assert len({r["crystal_id"] for r in cex}) == PER_CLASS
    assert {r["view"] for r in cex} == {"identity"}


@pytest.mark.parametrize("n_pg", [1, 2, 3, 7, 11, 20])
def test_plan_truncates_last_group_to_exact_count(n_pg):
    tasks = [t for t in synth.plan_crystals({"cex": 0, "pg": n_pg}, seed=1) if t.class_name == "pg"]
    assert sum(t.n_views for t in tasks) == n_pg
    assert [t.first_number for t in tasks] == list(np.cumsum([1] + [t.n_views for t in tasks[:-1]]))
    assert all(3 <= t.n_views <= 5 for t in tasks[:-1])


def test_same_seed_is_byte_identical_for_any_worker_count(tmp_path, small_set):
    again = tmp_path / "again"
    synth.generate(again, per_class=PER_CLASS, seed=5, workers=2, progress=False)
    first, second = _all_bytes(small_set), _all_bytes(again)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)


def test_different_seed_gives_different_files(tmp_path, small_set):
    other = tmp_path / "other"
    synth.generate(other, per_class=PER_CLASS, seed=6, workers=1, progress=False)
    first, second = _all_bytes(small_set), _all_bytes(other)
    images = [k for k in first if k.endswith(".png")]
    assert sum(first[k] != second[k] for k in images) == len(images)


def test_difficulty_changes_the_images(tmp_path):
    easy, hard = tmp_path / "easy", tmp_path / "hard"
    synth.generate(easy, per_class=4, seed=0, difficulty="easy", workers=1, progress=False)
    synth.generate(hard, per_class=4, seed=0, difficulty="hard", workers=1, progress=False)
    assert _all_bytes(easy)["cropped/cropped/cex/CEX (1).png"] != _all_bytes(hard)["cropped/cropped/cex/CEX (1).png"]


def test_non_empty_out_dir_is_refused_without_force(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    for force in (False, True):  # a user's file is never deleted, not even with --force
        with pytest.raises(CrystalscopeError, match=r"busy is not empty.*did not write"):
            synth.generate(out, per_class=3, workers=1, progress=False, force=force)
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    synth.generate(out, per_class=3, workers=1, progress=False)
    with pytest.raises(CrystalscopeError, match=r"earlier output.*--force"):
        synth.generate(out, per_class=3, workers=1, progress=False)
    synth.generate(out, per_class=3, workers=1, progress=False, force=True)
    assert len(list(out.rglob("*.png"))) == 6


@pytest.mark.parametrize("kwargs, message", [
    ({"per_class": 0}, "--per-class 0 must be 1 or more"),
    ({"difficulty": "medium"}, "--difficulty 'medium' is not known: use one of easy, realistic, hard"),
    ({"seed": -1}, "--seed -1 must be 0 or more"),
    ({"workers": 0}, "--workers 0 must be 1 or more"),
])
def test_bad_options_raise_one_line_errors(tmp_path, kwargs, message):
    options = {"per_class": 2, "workers": 1, "progress": False, **kwargs}
    with pytest.raises(CrystalscopeError) as info:
        synth.generate(tmp_path / "out", **options)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_no_out_dir(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_render = synth.render_cex

    def flaky_render(rng, difficulty):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_render(rng, difficulty)

    monkeypatch.setattr(synth, "render_cex", flaky_render)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(tmp_path / "out", per_class=5, workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither OUT_DIR nor a staging folder is left


def test_cli_writes_the_set_and_reports_it(tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["synth", str(out), "--per-class", "5", "--seed", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "wrote 5 CEX + 5 PG crops" in result.output
    assert len(list((out / "cropped" / "cropped" / "cex").glob("CEX (*).png"))) == 5
    assert len(list((out / "cropped" / "cropped" / "pg").glob("PG (*).png"))) == 5


def test_cli_bad_option_and_busy_folder_give_one_line_errors(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["synth", str(tmp_path / "x"), "--difficulty", "medium"])
    assert bad.exit_code == 2
    assert "error: --difficulty 'medium' is not known" in bad.output
    assert "Traceback" not in bad.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    refused = runner.invoke(app, ["synth", str(busy), "--per-class", "2", "-q"])
    assert refused.exit_code == 2
    assert f"error: OUT_DIR {busy} is not empty" in refused.output and "did not write" in refused.output


def test_pg_sizes_never_mimic_the_cex_size():
    # 151 x 151 means CEX in the real data; the stand-in keeps that shortcut exact
    sizes = [synth.pg_size(np.random.default_rng(i)) for i in range(20000)]
    assert (151, 151) not in sizes
    assert sum(h == 151 for h, _ in sizes) > 20 and sum(w == 151 for _, w in sizes) > 20
