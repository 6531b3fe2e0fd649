"""Particle measures (monitor/measure.py) on drawn shapes of known size."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("skimage")

from crystalscope.monitor.detect import segment_frame  # noqa: E402
from crystalscope.monitor.measure import Scale, feret, measure_frame  # noqa: E402


def _frame(draw) -> np.ndarray:
    """A 320 x 480 probe-like frame: dark, uneven, noisy, with shapes drawn 120 grey levels brighter."""
    shapes = Image.new("L", (480, 320), 0)
    draw(ImageDraw.Draw(shapes))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:320, :480]
    background = 40 + 6 * np.sin(xx / 150.0) + 4 * np.cos(yy / 110.0)
    frame = background + 120 * (np.asarray(shapes) > 0) + 2.0 * rng.standard_normal((320, 480))
    return frame.astype(np.float32)


def _measured(draw):
    grey = _frame(draw)
    return measure_frame(grey, segment_frame(grey))


def _close(value, truth, tolerance=0.02):
    return abs(value - truth) <= tolerance * truth


def test_a_disc_is_measured_within_two_percent():
    (disc,) = _measured(lambda d: d.ellipse((190, 110, 290, 210), fill=255))  # 101 px across in pixels
    assert _close(disc.ecd_px, 101.0) and _close(disc.area_px, math.pi * 50.5 ** 2)
    assert _close(disc.length_px, 101.0) and _close(disc.width_px, 101.0)
    assert disc.aspect < 1.03 and disc.solidity > 0.97 and not disc.touching


def test_a_rectangle_has_its_sides_as_length_and_width():
    (rect,) = _measured(lambda d: d.rectangle((100, 100, 219, 159), fill=255))  # 120 x 60 px
    assert _close(rect.length_px, 120.0) and _close(rect.width_px, 60.0) and _close(rect.area_px, 7200.0)
    assert _close(rect.aspect, 2.0)


def test_a_tilted_needle_has_its_length():
    angle, length, half_width = math.radians(30), 220.0, 7.0
    c, s = math.cos(angle), math.sin(angle)
    u, n = np.array([c, s]) * length / 2, np.array([-s, c]) * half_width
    centre = np.array([240.0, 160.0])
    corners = [tuple(centre + a * u + b * n) for a, b in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    (needle,) = _measured(lambda d: d.polygon(corners, fill=255))
    assert _close(needle.length_px, length) and needle.aspect > 10


def test_two_touching_discs_are_split_into_two_of_the_right_size():
    def two(d):
        d.ellipse((100, 110, 200, 210), fill=255)
        d.ellipse((196, 110, 296, 210), fill=255)  # 96 px apart: they overlap by 5 px
    particles = _measured(two)
    assert len(particles) == 2 and all(p.touching for p in particles)
    for p in particles:
        assert _close(p.ecd_px, 101.0)  # each gives up half of the small lens they share


def test_a_separate_disc_is_not_split_and_the_scale_converts():
    particles = _measured(lambda d: (d.ellipse((60, 60, 140, 140), fill=255), d.ellipse((300, 150, 400, 250), fill=255)))
    assert len(particles) == 2 and not any(p.touching for p in particles)
    row = particles[0].row(Scale(2.0))
    assert Scale(2.0).size_columns()[1] == "ecd_um" and _close(float(row[1]), 2.0 * particles[0].ecd_px, 1e-3)
    assert Scale().size_columns() == ("area_px2", "ecd_px", "length_px", "width_px")


def test_feret_of_a_single_row():
    mask = np.zeros((5, 20), bool)
    mask[2, 3:13] = True
    assert feret(mask) == (10.0, 1.0)
