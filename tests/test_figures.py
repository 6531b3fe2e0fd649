"""Figures without pyplot, saved atomically (crystalscope/figures.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from crystalscope.figures import new_figure, png_bytes, save_png


def _drawn(width: float, height: float, dpi: int):
    figure = new_figure(width, height, dpi=dpi)
    figure.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    return figure


def test_save_png_writes_the_figure_at_its_dpi_and_leaves_nothing_else(tmp_path):
    out = save_png(_drawn(3, 2, dpi=40), tmp_path / "plot.png")
    assert out == tmp_path / "plot.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (120, 80)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temporary file left behind


def test_png_bytes_are_a_png_of_the_figure():
    data = png_bytes(_drawn(2, 1, dpi=50))
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (100, 50)
        pixels = np.asarray(image.convert("L"))
        assert pixels.min() < pixels.max()  # the line was drawn, not a blank canvas
