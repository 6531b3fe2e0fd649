"""Checks that a written picture is a real one, shared by the tests of commands that draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def picture_ok(path: Path, min_size=(300, 200)) -> np.ndarray:
    """A real PNG of at least ``min_size`` with varied pixels; returns its pixels."""
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= min_size[0] and img.size[1] >= min_size[1], img.size
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    return pixels
