"""Particle detection (monitor/detect.py) on generated frames against their ground truth."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("scipy")

from crystalscope.monitor.detect import segment  # noqa: E402
from crystalscope.monitor.frames import box_iou, read_truth  # noqa: E402


def test_segmentation_finds_the_true_particles(onset_run):
    truth = read_truth(onset_run / "frames")
    found = total = 0
    for frame in range(0, 30, 3):
        grey = np.asarray(Image.open(onset_run / truth["frames"][frame]["file"]).convert("L"), dtype=np.float32)
        boxes = [r.box for r in segment(grey)]
        for p in truth["particles"].get(frame, []):
            box = tuple(int(p[k]) for k in ("x0", "y0", "x1", "y1"))
            total += 1
            found += any(box_iou(box, b) >= 0.5 for b in boxes)
    assert total >= 10 and found / total >= 0.7
