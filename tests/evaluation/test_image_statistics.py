"""The fast image statistics of the rejection give the same numbers as the plain numpy version.

``predict`` computes them for every image (rejection of foreign images), so they were made
cheaper (per-channel planes instead of reductions over the colour axis, bincounts instead of
repeated comparisons); the straightforward version they replaced is kept here as the reference.
"""

from __future__ import annotations

import numpy as np
import pytest

from crystalscope.data.transforms import Preprocessing
from crystalscope.evaluation import ood


def reference_image_statistics(images: np.ndarray) -> np.ndarray:
    rgb = np.asarray(images, dtype=np.float32) / 255.0
    grey = rgb.mean(axis=3)
    flat = grey.reshape(len(grey), -1)
    quantiles = np.quantile(flat, [0.01, 0.1, 0.5, 0.9, 0.99], axis=1).T
    saturation = (rgb.max(axis=3) - rgb.min(axis=3)).reshape(len(grey), -1).mean(axis=1)
    fine = np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2))
    small = ood._blocks(grey, 4).mean(axis=(2, 4))
    coarse = np.abs(np.diff(small, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(small, axis=2)).mean(axis=(1, 2))
    h, w = small.shape[1] * 4, small.shape[2] * 4
    high = np.abs(grey[:, :h, :w] - np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)).mean(axis=(1, 2))
    histogram = np.stack([((flat >= lo) & (flat < lo + 0.125)).mean(axis=1) for lo in np.arange(0, 1, 0.125)], 1)
    histogram[:, -1] += (flat >= 1.0).mean(axis=1)
    blocks = ood._blocks(grey, 8)
    local_std = np.quantile(blocks.std(axis=(2, 4)).reshape(len(grey), -1), [0.1, 0.5, 0.9], axis=1).T
    block_mean = np.quantile(blocks.mean(axis=(2, 4)).reshape(len(grey), -1), [0.1, 0.9], axis=1).T
    logs = np.log(np.column_stack([flat.std(axis=1), saturation, (flat < 0.02).mean(axis=1),
                                   (flat > 0.98).mean(axis=1), fine, coarse, high, histogram, local_std]) + 1e-3)
    return np.column_stack([flat.mean(axis=1), logs[:, 0], quantiles, logs[:, 1:], block_mean,
                            reference_texture_statistics(grey)]).astype(np.float64)


def reference_texture_statistics(grey: np.ndarray) -> np.ndarray:
    n, h, w = grey.shape
    centre = grey[:, 1:-1, 1:-1]
    brighter = np.zeros(centre.shape, dtype=np.int8)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                brighter += grey[:, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] > centre + ood.NEIGHBOUR_STEP
    counts = np.stack([(brighter == k).mean(axis=(1, 2)) for k in range(9)], axis=1)
    power = np.abs(np.fft.rfft2(grey - grey.mean(axis=(1, 2), keepdims=True))) ** 2
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
    edges = np.geomspace(2.0 / min(h, w), 0.5, ood.SPECTRUM_BANDS + 1)
    rings = [(radius >= lo) & (radius < hi) for lo, hi in zip(edges[:-1], edges[1:])]
    # a tiny image can leave a ring empty: level 0 (log 1e-12), not a NaN
    bands = np.log(np.stack([power[:, ring].sum(axis=1) / max(ring.sum(), 1) for ring in rings], axis=1) + 1e-12)
    log_frequency = np.log(np.sqrt(edges[:-1] * edges[1:]))
    slope, intercept = np.polyfit(log_frequency, bands.T, 1) if n else np.zeros((2, 0))
    residuals = bands - (slope[:, None] * log_frequency + intercept[:, None])
    return np.column_stack([np.log(counts + 1e-3), slope, residuals[:, 1:-1]])


def _crops(real_samples) -> np.ndarray:
    pre = Preprocessing(image_size=64)
    return np.stack([pre.resize_uint8(p) for p in sorted(real_samples.iterdir()) if p.suffix.lower() in {".png", ".jpg", ".jpeg"}])


@pytest.mark.parametrize("shape", [(6, 64, 64, 3), (3, 17, 23, 3), (2, 16, 16, 3)])
def test_fast_statistics_equal_the_reference_on_random_images(shape):
    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    images[0] = 255  # a saturated frame: grey exactly 1.0 lands in the last histogram bin
    fast, reference = ood.image_statistics(images), reference_image_statistics(images)
    assert fast.shape == reference.shape == (shape[0], len(ood.IMAGE_STATISTICS))
    np.testing.assert_allclose(fast, reference, rtol=1e-12, atol=1e-12)


def test_fast_statistics_equal_the_reference_on_real_crops(real_samples):
    images = _crops(real_samples)
    np.testing.assert_allclose(ood.image_statistics(images), reference_image_statistics(images),
                               rtol=1e-12, atol=1e-12)


def test_statistics_tell_a_blank_frame_from_a_crop(real_samples):
    images = _crops(real_samples)[:1]
    blank = np.zeros_like(images)
    assert not np.allclose(ood.image_statistics(images), ood.image_statistics(blank))
