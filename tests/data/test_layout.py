"""The one folder rule (crystalscope.data.layout), and that audit, split and train all follow it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crystalscope.data import layout
from crystalscope.data.audit import audit_dataset, discover_source
from crystalscope.data.dataset import index_folder, index_split
from crystalscope.data.layout import (class_folders, collect_class_files, discover, find_split_folders,
                                      is_hidden, is_image_file, list_images, resolve_source_root)
from crystalscope.data.split import split_dataset
from crystalscope.errors import CrystalscopeError
from crystalscope.formats import SPLITS


def png(path: Path, seed: int = 0, size: tuple[int, int] = (12, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def messy_split(root: Path) -> Path:
    """Upper-case split names, hidden files and folders at every depth, an upper-case extension."""
    seed = 0
    for split in ("Train", "VAL", "test"):
        for class_name in ("cex", "PG"):
            for i in range(3):
                seed += 1
                png(root / split / class_name / f"{class_name} ({i}).png", seed)
            png(root / split / class_name / ".staging" / "leftover.png", seed + 100)  # hidden folder
            png(root / split / class_name / ".hidden.png", seed + 200)  # hidden file
        png(root / split / ".tmp-class" / "x.png", seed + 300)  # hidden class folder
    png(root / "Train" / "cex" / "nested" / "CEX (9).PNG", 999)  # a nested folder and .PNG count
    (root / "Train" / "cex" / "notes.txt").write_text("not an image")
    png(root / ".staging-split" / "cex" / "a.png", 1000)  # a hidden split-like folder
    return root


def test_image_extensions_and_hidden_names():
    assert is_image_file("a.PNG") and is_image_file("b.tiff") and not is_image_file("c.txt")
    assert is_hidden(Path("d/.x/a.png"), base="d") and is_hidden(".a.png")
    assert not is_hidden(Path("d/x/a.png"), base="d") and not is_hidden(Path(".d/x/a.png"), base=".d")


def test_hidden_files_and_folders_are_skipped_everywhere(tmp_path):
    root = messy_split(tmp_path / "s")
    train = root / "Train"
    assert list(class_folders(train)) == ["cex", "pg"]
    images = list_images(train / "cex")
    assert [p.name for p in images] == ["cex (0).png", "cex (1).png", "cex (2).png", "CEX (9).PNG"]
    found = collect_class_files(train)
    assert {c: len(f) for c, f in found.files.items()} == {"cex": 4, "pg": 3}
    assert [p.name for p in found.non_images] == ["notes.txt"]
    assert not any(layout.is_hidden(p, root) for files in found.files.values() for p in files)


def test_split_folder_needs_all_three_names_in_any_case(tmp_path):
    root = messy_split(tmp_path / "s")
    folders = find_split_folders(root)
    assert list(folders) == list(SPLITS)
    assert [p.name for p in folders.values()] == ["Train", "VAL", "test"]
    assert find_split_folders(root / "Train") is None  # class folders only: not a split


def test_a_partial_split_is_an_error_naming_what_is_missing(tmp_path):
    png(tmp_path / "s" / "train" / "cex" / "a.png")
    png(tmp_path / "s" / "Test" / "cex" / "a.png")
    with pytest.raises(CrystalscopeError, match=r"missing split folder\(s\) val;") as info:
        find_split_folders(tmp_path / "s")
    assert "\n" not in str(info.value)
    png(tmp_path / "s" / "val" / "cex" / "a.png")
    png(tmp_path / "s" / "TRAIN" / "cex" / "a.png")
    with pytest.raises(CrystalscopeError, match="split folders 'TRAIN' and 'train' differ only in case"):
        find_split_folders(tmp_path / "s")


def test_kaggle_root_is_found_from_the_archive_or_the_first_cropped(tmp_path):
    crops = tmp_path / "archive" / "cropped" / "cropped"
    png(crops / "cex" / "CEX (1).png")
    png(crops / "pg" / "PG (1).png", 1)
    assert resolve_source_root(tmp_path / "archive") == crops
    assert resolve_source_root(tmp_path / "archive" / "cropped") == crops
    assert discover(tmp_path / "archive").kind == "kaggle"
    assert discover(crops).kind == "class-folders"
    with pytest.raises(CrystalscopeError, match="does not exist"):
        resolve_source_root(tmp_path / "nope")


def test_audit_and_train_see_the_same_dataset(tmp_path):
    """Upper-case split names and hidden files: both commands count the same files per split."""
    root = messy_split(tmp_path / "s")
    for_training = index_split(root)
    source = discover_source(root)
    result = audit_dataset(root, out_dir=tmp_path / "audit", progress=False, workers=1)
    assert result.layout == "split"
    seen_by_train = {s: {c: int((ds.labels == i).sum()) for i, c in enumerate(ds.class_names)}
                     for s, ds in for_training.items()}
    assert result.counts == {s: seen_by_train[s] for s in sorted(seen_by_train)}
    assert seen_by_train["train"] == {"cex": 4, "pg": 3}
    assert sorted(source.paths) == sorted(p for ds in for_training.values() for p in ds.paths)
    assert result.non_image_files == ["Train/cex/notes.txt"]


def test_split_refuses_a_split_and_reads_the_same_classes_as_train(tmp_path):
    root = messy_split(tmp_path / "s")
    with pytest.raises(CrystalscopeError, match="already looks like a split"):
        split_dataset(root, tmp_path / "out", progress=False)
    summary = split_dataset(root / "Train", tmp_path / "out", group_by="none", progress=False, workers=1)
    train = index_folder(root / "Train")
    assert {c: sum(n.values()) for c, n in summary.counts.items()} == \
           {c: int((train.labels == i).sum()) for i, c in enumerate(train.class_names)}


def test_list_images_skips_files_in_hidden_folders(tmp_path):
    for name in ("a.png", ".b.png", ".staging/c.png", "sub/d.JPG", "e.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["a.png", "sub/d.JPG"]


def test_walk_files_follows_a_folder_link_once_and_survives_loops(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "a" / "deep" / "x.png")
    (tmp_path / "a" / "up").symlink_to("..", target_is_directory=True)  # a loop back to tmp_path
    (tmp_path / "b").symlink_to("a", target_is_directory=True)  # a second way to a/
    (tmp_path / "self.png").symlink_to("self.png")
    walked = [p.relative_to(tmp_path).as_posix() for p in layout.walk_files(tmp_path)]
    assert walked.count("a/deep/x.png") + walked.count("b/deep/x.png") == 1
    assert "self.png" in walked  # an image candidate: the decoder says why it is unreadable
    images, _ = layout.list_files(tmp_path)
    assert len(images) == 2


def test_real_path_keeps_a_link_loop_as_written(tmp_path):
    (tmp_path / "loop.png").symlink_to("loop.png")
    assert layout.real_path(tmp_path / "loop.png").name == "loop.png"
