"""Pictures of the monitor (monitor/overlay.py): boxes coloured by class, the fraction over time."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from crystalscope.monitor.overlay import CLASS_COLOURS, REJECTED_COLOUR, overlay_jpeg, timeline_png
from crystalscope.monitor.timeline import AlarmRule, FrameRecord, Timeline


FRAME = (20, 20, 20)
# the colours a pixel may be; JPEG blurs thin lines, so a pixel is judged by the nearest one
CANDIDATES = {"pg": CLASS_COLOURS["pg"], "cex": CLASS_COLOURS["cex"], "rejected": REJECTED_COLOUR, "frame": FRAME}


def _looks(pixel) -> str:
    return min(CANDIDATES, key=lambda name: int(np.abs(np.asarray(pixel, dtype=int) - CANDIDATES[name]).sum()))


def test_overlay_boxes_are_coloured_by_class_and_rejected_ones_hatched():
    frame = Image.new("L", (200, 120), 20)
    particles = [{"box": (10, 10, 60, 60), "class": "pg", "status": "ok", "confidence": 0.93},
                 {"box": (80, 10, 130, 60), "class": "cex", "status": "ok"},
                 {"box": (140, 10, 190, 60), "class": "pg", "status": "out of focus"}]
    jpeg = overlay_jpeg(frame, particles)
    with Image.open(io.BytesIO(jpeg)) as img:
        assert img.format == "JPEG" and img.size == frame.size
        pixels = np.asarray(img.convert("RGB"))
    assert _looks(pixels[35, 10]) == "pg" and _looks(pixels[35, 80]) == "cex"
    assert _looks(pixels[35, 140]) == "rejected"
    # inside: the ok boxes are left clear, the rejected one carries hatching
    assert _looks(pixels[45, 35]) == _looks(pixels[45, 105]) == "frame"
    inside = [_looks(pixel) for pixel in pixels[15:55, 145:185].reshape(-1, 3)]
    assert inside.count("rejected") / len(inside) > 0.03
    assert _looks(pixels[100, 100]) == "frame"  # outside every box: the frame, in grey


def test_timeline_png_is_a_real_figure_with_the_alarm():
    pytest.importorskip("matplotlib")
    timeline = Timeline(["cex", "pg"], "pg", AlarmRule(fraction=0.3, frames=2, smoothing=1.0))
    for i in range(12):
        timeline.add(FrameRecord(i, f"f{i}.png", 60.0 * i, {"cex": 8, "pg": 1 if i < 6 else 6}))
    timeline.add(FrameRecord(12, "bad.png", 720.0, status="error: unreadable"))
    assert timeline.alarms
    with Image.open(io.BytesIO(timeline_png(timeline, onset_s=330.0))) as img:
        assert img.format == "PNG" and img.size == (800, 360)
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    orange = np.array([255, 165, 0])  # the alarm line (matplotlib's "orange")
    assert (np.abs(pixels - orange).sum(axis=1) < 30).sum() > 50
