"""Decoding any file into 8-bit RGB the same way everywhere (crystalscope.data.images)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from crystalscope.data.images import ImageReadError, load_rgb, to_rgb


def test_modes_become_rgb_the_same_way():
    grey16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(grey16)).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 0))  # fully transparent: the black background
    assert np.asarray(to_rgb(rgba)).max() == 0
    assert to_rgb(Image.new("L", (3, 2), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_unreadable_and_too_large_files_name_the_file(tmp_path, monkeypatch):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageReadError, match="broken.png"):
        load_rgb(broken)
    with pytest.raises(ImageReadError, match="file not found"):
        load_rgb(tmp_path / "missing.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "big.png")
    monkeypatch.setenv("CRYSTALSCOPE_MAX_PIXELS", "500")
    with pytest.raises(ImageReadError, match="30 x 20 pixels, above the limit of 500"):
        load_rgb(tmp_path / "big.png")


@pytest.mark.parametrize("kind,reason", [("fifo", "FIFO"), ("device", "character device"),
                                         ("loop", "symbolic link loop"), ("dangling", "dangling symbolic link"),
                                         ("folder", "a folder")])
def test_a_file_that_would_block_or_loop_is_refused_with_its_reason(tmp_path, kind, reason):
    import os

    path = tmp_path / "x.png"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    elif kind == "device":
        path.symlink_to("/dev/zero")  # reading it would never end
    elif kind == "loop":
        path.symlink_to(path.name)
    elif kind == "dangling":
        path.symlink_to("gone.png")
    else:
        path.mkdir()
    with pytest.raises(ImageReadError, match=reason) as info:
        load_rgb(path)
    assert str(info.value).startswith(f"{path}: ")  # names the input


def test_open_regular_hands_back_a_readable_file(tmp_path):
    from crystalscope.data.images import open_regular

    Image.new("RGB", (4, 3)).save(tmp_path / "a.png")
    with open_regular(tmp_path / "a.png") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
