"""Indexing class folders and decoding them once (crystalscope.data.dataset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crystalscope.data.dataset import decode_images, index_folder, index_split
from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError


def png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10 + value % 5, 12), (value, value, value)).save(path)
    return path


def test_index_folder_labels_follow_the_given_class_names(tmp_path):
    for i in range(3):
        png(tmp_path / "PG" / f"PG ({i}).png", 10 * i)
    png(tmp_path / "cex" / "CEX (1).png", 99)
    png(tmp_path / "cex" / ".partial" / "CEX (2).png", 1)  # an interrupted copy: not an image of the set
    folder = index_folder(tmp_path, class_names=["pg", "cex", "other"])
    assert folder.class_names == ["pg", "cex", "other"] and len(folder) == 4
    assert folder.labels.tolist() == [1, 0, 0, 0]
    with pytest.raises(CrystalscopeError, match="not classes of the model"):
        index_folder(tmp_path, class_names=["pg"])


def test_index_split_accepts_split_names_in_any_case(tmp_path):
    for split in ("TRAIN", "Val", "test"):
        png(tmp_path / split / "cex" / "a.png", 1)
        png(tmp_path / split / "pg" / "b.png", 2)
    splits = index_split(tmp_path)
    assert list(splits) == ["train", "val", "test"]
    assert splits["train"].root == tmp_path / "TRAIN"
    with pytest.raises(CrystalscopeError, match=r"missing split folder\(s\) train, val, test"):
        index_split(tmp_path / "TRAIN")


def test_decode_images_matches_the_preprocessing_of_one_image(tmp_path):
    paths = [png(tmp_path / f"{i}.png", 40 * i) for i in range(5)]
    pre = Preprocessing(image_size=16, resize="pad")
    batch = decode_images(paths, pre, workers=2, progress=False)
    assert batch.shape == (5, 16, 16, 3) and batch.dtype == np.uint8
    for i, path in enumerate(paths):
        assert np.array_equal(batch[i], pre.resize_uint8(path))
    assert np.array_equal(decode_images(paths, pre, workers=None, progress=False), batch)
