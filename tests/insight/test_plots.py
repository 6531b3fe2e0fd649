"""The map figure of embed and drift (insight/plots.py): colours, points, rings and panels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from crystalscope.insight.plots import Panel, colour_of, map_figure  # noqa: E402


def test_colour_of_cycles_through_tab10():
    from matplotlib import colors

    for index in (0, 3, 9):
        expected = tuple(round(255 * v) for v in colors.to_rgb(f"C{index}"))
        assert colour_of(index) == expected
    assert colour_of(10) == colour_of(0)


def test_map_figure_draws_the_points_in_their_colours(tmp_path):
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.normal(0, 1, (30, 2)), rng.normal(6, 1, (30, 2))])
    keys = ["a"] * 30 + ["b"] * 30
    path = map_figure(coords, keys, tmp_path / "map.png", colours={"a": (255, 0, 0), "b": (0, 0, 255)},
                      marker_keys=["cex", "pg"] * 30, ring=np.arange(60) < 2, title="two groups")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (720, 675)  # 8 x 7.5 inches at 90 dpi
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    # both point colours (drawn at alpha 0.75 over white) are present
    for colour in ((255, 0, 0), (0, 0, 255)):
        blended = np.array(colour) * 0.75 + 255 * 0.25
        assert (np.abs(pixels - blended).sum(axis=1) < 12).sum() > 50, colour
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]  # written atomically, no staging left


def test_map_figure_with_panels_is_wider_and_shows_them(tmp_path):
    sheet = Image.new("RGB", (200, 100), (0, 160, 0))
    path = map_figure(np.random.default_rng(1).normal(size=(20, 2)), ["x"] * 20, tmp_path / "panels.png",
                      panels=[Panel("cluster 0", sheet, colour_of(0)), Panel("cluster 1", sheet, colour_of(1))])
    with Image.open(path) as img:
        assert img.size[0] == 13 * 90
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    assert (np.abs(pixels - (0, 160, 0)).sum(axis=1) < 6).sum() > 1000  # the panels' pictures are drawn
