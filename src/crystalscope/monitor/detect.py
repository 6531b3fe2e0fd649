"""Find the particles of a probe frame and cut the crops the classifier was trained on.

Two detectors, chosen by measurement against the generated ground truth (docs/monitor.md):

- ``segment`` (default): subtract the probe's slowly varying background (a grey opening far
  larger than any particle, on a 16x reduced frame), threshold at a multiple of the robust
  noise level, close small gaps so a needle bundle stays one particle, fill holes, drop
  specks, and take each connected region's bounding box. Runs at half resolution.
- ``tiles``: crop-sized square tiles on a half-overlapping grid, kept where enough of the tile
  is foreground. It needs no segmentation but its boxes do not follow particles.

A crop is the detected box (grown by :data:`CROP_MARGIN` on each side; none by default: PG
training crops are cut tight and a margin measured worse) and at least :data:`MIN_CROP_SIDE` px
a side (the training crops are 130-230 px); the model's own :class:`Preprocessing` then resizes it, exactly as in training.
scipy.ndimage does the image morphology (no OpenCV needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from crystalscope.errors import CrystalscopeError, require

DETECTORS = ("segment", "tiles")
#: The training crops are 130-230 px a side: a crop smaller than this gets context added around it.
MIN_CROP_SIDE = 130
CROP_MARGIN = 0.0
#: Smallest region kept, in full-resolution pixels (about a 40 x 40 px particle).
MIN_AREA = 1600
TILE_SIDE = 151
#: Default focus limit: std of the Laplacian (after a 1 px Gaussian) inside the box, in grey levels.
#: Focused particles of generated runs measure 2.0-6.1 (5th-95th percentile), out-of-focus ones
#: 0.8-1.9 (docs/monitor.md); a crop-trained model calls most blurred needles PG, so they are
#: counted apart rather than classified.
MIN_SHARPNESS = 1.9
#: A region with a side longer than this is several overlapping particles (the largest crop is
#: 230 px): classifying it as one particle made most of the false PG calls (docs/monitor.md).
MAX_PARTICLE_SIDE = 260
SCALE = 2             # segmentation works on a frame reduced 2x
_SCALE = SCALE
_BACKGROUND_SCALE = 16  # the background estimate on one reduced 16x
_SIGMA_LEVELS = 4.0   # threshold in robust noise sigmas
_MIN_LEVEL = 8.0      # ... and at least this many grey levels above the background


@dataclass(frozen=True)
class Region:
    """A detected particle: box ``(x0, y0, x1, y1)`` in frame pixels (x1, y1 exclusive) and its area."""

    box: tuple[int, int, int, int]
    area: int


def to_grey(image: Image.Image) -> np.ndarray:
    """A frame as ``float32 (H, W)`` grey levels (probe frames are grey; RGB is averaged)."""
    return np.asarray(image.convert("L"), dtype=np.float32)


def foreground(grey: np.ndarray) -> tuple[np.ndarray, float]:
    """Half-resolution brightness above the background, and the threshold that marks particles."""
    signal, _, level = _signal(grey)
    return signal, level


def _signal(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Half-resolution smoothed signal, the half-resolution background under it, the threshold."""
    ndimage = require("scipy.ndimage", "monitor")
    h, w = grey.shape
    small = np.asarray(Image.fromarray(grey, mode="F").resize((max(w // _SCALE, 1), max(h // _SCALE, 1)),
                                                            Image.Resampling.BOX))
    coarse_size = (max(w // _BACKGROUND_SCALE, 1), max(h // _BACKGROUND_SCALE, 1))
    coarse = np.asarray(Image.fromarray(grey, mode="F").resize(coarse_size, Image.Resampling.BOX))
    # an opening wider than the largest particle (~230 px) keeps only the illumination
    background = ndimage.gaussian_filter(ndimage.grey_opening(coarse, size=(17, 17)), 1.5)
    background = np.asarray(Image.fromarray(background.astype(np.float32), mode="F").resize(
        small.shape[::-1], Image.Resampling.BILINEAR))
    signal = ndimage.gaussian_filter(small - background, 1.5)
    deviation = np.median(np.abs(signal - np.median(signal))) * 1.4826
    return signal, background, max(_SIGMA_LEVELS * float(deviation), _MIN_LEVEL)


@dataclass(frozen=True)
class Segmentation:
    """What :func:`segment_frame` found: the regions, and the masks they came from.

    Attributes:
        regions: the kept regions (boxes in frame pixels), ``regions[i]`` is label ``labels_of[i]``.
        labels: ``int32`` label image at 1/:data:`SCALE` resolution (0 background, dropped specks 0).
        labels_of: the label of each region in ``labels``.
        background: the probe's background at the same reduced resolution (grey levels).
    """

    regions: list[Region]
    labels: np.ndarray
    labels_of: list[int]
    background: np.ndarray


def segment(grey: np.ndarray, min_area: int = MIN_AREA) -> list[Region]:
    """Particles of a grey frame by background subtraction, threshold and connected regions.

    Example:
        >>> frame = np.full((192, 256), 40, np.float32); frame[50:120, 60:140] += 120
        >>> [r.box for r in segment(frame)]
        [(56, 46, 144, 124)]
    """
    return segment_frame(grey, min_area).regions


def segment_frame(grey: np.ndarray, min_area: int = MIN_AREA) -> Segmentation:
    """:func:`segment` with the reduced-resolution label image and background it worked on.

    Example:
        >>> frame = np.full((192, 256), 40, np.float32); frame[50:120, 60:140] += 120
        >>> found = segment_frame(frame)
        >>> found.labels.shape, found.labels_of
        ((96, 128), [1])
    """
    ndimage = require("scipy.ndimage", "monitor")
    signal, background, level = _signal(grey)
    mask = signal > level
    disc = _disc(3)
    # closing joins the needles of one bundle; filling makes an agglomerate one solid region
    mask = fill_holes(ndimage.binary_closing(mask, structure=disc, border_value=0))
    mask = ndimage.binary_opening(mask, structure=_disc(1))
    labels, count = ndimage.label(mask)
    labels = labels.astype(np.int32)
    if count == 0:
        return Segmentation([], labels, [], background)
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    h, w = grey.shape
    regions, kept = [], []
    for label, (slices, area) in enumerate(zip(ndimage.find_objects(labels), areas), start=1):
        full_area = int(area) * _SCALE * _SCALE
        if full_area < min_area:
            labels[slices][labels[slices] == label] = 0
            continue
        ys, xs = slices
        box = (xs.start * _SCALE, ys.start * _SCALE, min(xs.stop * _SCALE, w), min(ys.stop * _SCALE, h))
        regions.append(Region(box, full_area))
        kept.append(label)
    return Segmentation(regions, labels, kept, background)


def tiles(grey: np.ndarray, side: int = TILE_SIDE, min_cover: float = 0.15) -> list[Region]:
    """Crop-sized tiles on a half-overlapping grid, kept where at least ``min_cover`` is foreground."""
    signal, level = foreground(grey)
    mask = signal > level
    h, w = grey.shape
    step = max(side // 2, 1)
    regions = []
    for y in range(0, max(h - side, 0) + 1, step):
        for x in range(0, max(w - side, 0) + 1, step):
            part = mask[y // _SCALE:(y + side) // _SCALE, x // _SCALE:(x + side) // _SCALE]
            if part.size and part.mean() >= min_cover:
                regions.append(Region((x, y, min(x + side, w), min(y + side, h)), int(part.sum()) * _SCALE ** 2))
    return regions


def sharpness(grey: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Focus measure of a region: std of the Laplacian of the lightly smoothed grey levels.

    Example:
        >>> sharp = np.zeros((40, 40), np.float32); sharp[:, ::4] = 200
        >>> sharpness(sharp, (0, 0, 40, 40)) > sharpness(np.full((40, 40), 100, np.float32), (0, 0, 40, 40))
        True
    """
    ndimage = require("scipy.ndimage", "monitor")
    x0, y0, x1, y1 = box
    region = grey[y0:y1, x0:x1]
    if region.size == 0:
        return 0.0
    return float(np.std(ndimage.laplace(ndimage.gaussian_filter(region, 1.0))))


def detect(grey: np.ndarray, detector: str = "segment") -> list[Region]:
    """Particles of a frame with the named detector (``segment`` or ``tiles``)."""
    if detector == "segment":
        return segment(grey)
    if detector == "tiles":
        return tiles(grey)
    raise CrystalscopeError(f"--detector {detector!r} is not known: use one of {', '.join(DETECTORS)}")


def crop_box(box: tuple[int, int, int, int], frame_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The crop to classify for a detected box: margin added, at least MIN_CROP_SIDE, inside the frame.

    Example:
        >>> crop_box((100, 100, 140, 150), (1024, 768))  # small: context added around it
        (55, 60, 185, 190)
        >>> crop_box((0, 10, 200, 160), (1024, 768))
        (0, 10, 200, 160)
    """
    width, height = frame_size
    x0, y0, x1, y1 = box
    sides = []
    for lo, hi, limit in ((x0, x1, width), (y0, y1, height)):
        side = max(round((hi - lo) * (1 + 2 * CROP_MARGIN)), MIN_CROP_SIDE)
        side = min(side, limit)
        start = int(round((lo + hi) / 2 - side / 2))
        start = min(max(start, 0), limit - side)
        sides.append((start, start + side))
    (cx0, cx1), (cy0, cy1) = sides
    return cx0, cy0, cx1, cy1


def cut_crops(image: Image.Image, regions: list[Region]) -> list[Image.Image]:
    """RGB crops (grey in three equal channels, like the training crops) for the regions.

    Each crop is made RGB, not the whole frame: a frame is far larger than its few crops.
    """
    grey = image.convert("L")  # a copy only, for the grey frame the monitor passes
    return [grey.crop(crop_box(r.box, grey.size)).convert("RGB") for r in regions]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background part that does not reach the border filled in.

    The same as ``scipy.ndimage.binary_fill_holes``, by one labelling instead of repeated dilations.

    Example:
        >>> ring = np.ones((5, 5), bool); ring[2, 2] = False
        >>> bool(fill_holes(ring)[2, 2])
        True
    """
    ndimage = require("scipy.ndimage", "monitor")
    outside, count = ndimage.label(~mask)
    reaches_border = np.zeros(count + 1, dtype=bool)
    reaches_border[np.concatenate([outside[0], outside[-1], outside[:, 0], outside[:, -1]])] = True
    reaches_border[0] = False  # label 0 is the mask itself
    return ~reaches_border[outside]


def _disc(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return (yy * yy + xx * xx) <= radius * radius
