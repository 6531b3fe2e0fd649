"""Measure the particles of a segmented frame: touching ones split, each sized in px or um.

The detector's masks (:func:`crystalscope.monitor.detect.segment_frame`, at half resolution)
say which pixels belong to which region; here

1. a region that looks merged (solidity of its full-resolution mask under
   :data:`SPLIT_SOLIDITY`, or a side longer than ``max_side``) is split by a watershed of its distance transform from one marker per
   distance maximum that stands :data:`SPLIT_DEPTH` px above the saddle to its neighbour (the
   h-maxima): two touching discs become two, one elongated crystal stays one. A piece still
   longer than ``max_side`` cannot be split and is a ``cluster``;
2. each piece is measured at full resolution: its pixels are those of the piece that stand at
   least :data:`EDGE_LEVEL` grey levels above the background (the level at which
   ``synth-process`` calls a pixel visible), holes filled;
3. scikit-image's ``regionprops_table`` gives area, equivalent circle diameter, solidity and
   mean intensity (a well-kept library rather than our own code); the length and width are the
   sides of the narrowest bounding rectangle (width = minimum Feret diameter, length = the
   extent across it), from the convex hull of the pixels' corners, which scikit-image does not
   offer.

A needle's length is its ``length``; the aspect ratio is ``length / width`` (1 for a disc).

Example:
    >>> import numpy as np
    >>> from crystalscope.monitor.detect import segment_frame
    >>> frame = np.full((240, 320), 40, np.float32)
    >>> yy, xx = np.mgrid[:240, :320]
    >>> frame[(yy - 120) ** 2 + (xx - 160) ** 2 <= 50 ** 2] += 120
    >>> [round(p.ecd_px) for p in measure_frame(frame, segment_frame(frame))]
    [100]
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from crystalscope.errors import CrystalscopeError, require
from crystalscope.monitor.detect import (MAX_PARTICLE_SIDE, SCALE, Region, Segmentation, fill_holes, segment_frame,
                                         sharpness, tiles)

#: Regions less solid than this (area / convex hull area) are tried for a split.
SPLIT_SOLIDITY = 0.9
#: A distance maximum must rise this far (reduced-frame px) above its saddle to seed a particle.
SPLIT_DEPTH = 4.0
#: ... and be at least this far (reduced-frame px) from the edge: no particle narrower than ~32 px.
MIN_PIECE_RADIUS = 8.0
#: Grey levels above the background that make a pixel part of a particle (synth-process's
#: visible level); a real probe may need its own, like ``--min-sharpness``.
EDGE_LEVEL = 20.0
#: Particle measures, in the order of the particles.csv columns (sizes then take a unit suffix).
SIZE_MEASURES = ("area", "ecd", "length", "width")
SHAPE_MEASURES = ("aspect", "solidity", "mean_intensity", "sharpness", "touching")


@dataclass(frozen=True)
class Scale:
    """The frames' scale: ``um_per_px`` when known, else sizes stay in pixels.

    Example:
        >>> Scale(1.5).unit, Scale(1.5).length(10.0), Scale().unit
        ('um', 15.0, 'px')
    """

    um_per_px: float | None = None

    def __post_init__(self):
        if self.um_per_px is not None and not (math.isfinite(self.um_per_px) and self.um_per_px > 0):
            raise CrystalscopeError(f"--um-per-px {self.um_per_px}: the frames' scale must be a positive number "
                                    "of micrometres per pixel (leave it out to measure in px)")

    @property
    def unit(self) -> str:
        return "px" if self.um_per_px is None else "um"

    def length(self, px: float) -> float:
        return px if self.um_per_px is None else px * self.um_per_px

    def area(self, px2: float) -> float:
        return px2 if self.um_per_px is None else px2 * self.um_per_px ** 2

    def size_columns(self) -> tuple[str, ...]:
        """``area_px2, ecd_px, length_px, width_px`` (or ``..._um2``, ``..._um``): the unit in the name."""
        u = self.unit
        return (f"area_{u}2", f"ecd_{u}", f"length_{u}", f"width_{u}")


@dataclass
class MeasuredParticle:
    """One particle of a frame: its box (for the classifier) and its measures in frame pixels.

    ``cluster`` pieces could not be split into particles: their measures are ``None``.
    """

    region: Region
    area_px: float | None = None
    ecd_px: float | None = None
    length_px: float | None = None
    width_px: float | None = None
    aspect: float | None = None
    solidity: float | None = None
    mean_intensity: float | None = None
    sharpness: float = 0.0
    touching: bool = False
    cluster: bool = False

    def label(self, scale: Scale) -> str:
        """Short text for a picture: ``ECD 183 um  L/W 1.0`` (``+``: touches another); blank for a cluster."""
        if self.ecd_px is None:
            return ""
        return f"ECD {scale.length(self.ecd_px):.0f} {scale.unit}  L/W {self.aspect:.1f}{' +' if self.touching else ''}"

    def row(self, scale: Scale) -> list[str]:
        """The measure columns of particles.csv (sizes in ``scale``'s unit; blank for a cluster)."""
        if self.area_px is None:
            return ["", "", "", "", "", "", "", f"{self.sharpness:.4f}", str(int(self.touching))]
        sizes = [scale.area(self.area_px), *(scale.length(v) for v in (self.ecd_px, self.length_px, self.width_px))]
        return [*(f"{v:.3f}" for v in sizes), f"{self.aspect:.4f}", f"{self.solidity:.4f}",
                f"{self.mean_intensity:.2f}", f"{self.sharpness:.4f}", str(int(self.touching))]


def feret(mask: np.ndarray) -> tuple[float, float]:
    """``(length, width)`` of a mask: its narrowest bounding rectangle's sides, in pixels.

    The width is the minimum Feret (caliper) diameter; the length the extent at right angles to
    it. Pixel corners are used, so an axis-aligned 30 x 10 rectangle of pixels is 30 x 10.

    Example:
        >>> m = np.zeros((20, 40), bool); m[5:15, 5:35] = True
        >>> feret(m)
        (30.0, 10.0)
    """
    length, width, _ = hull_measures(mask)
    return length, width


def hull_measures(mask: np.ndarray) -> tuple[float, float, float]:
    """``(length, width, convex hull area)`` of a mask from the convex hull of its pixels' corners.

    Example:
        >>> m = np.zeros((20, 40), bool); m[5:15, 5:35] = True; m[5:10, 5:20] = False
        >>> length, width, hull = hull_measures(m)
        >>> round(float(m.sum() / hull), 3)  # solidity: the area over the hull's (a corner cut off)
        0.857
    """
    spatial = _libraries()[1]
    rows = np.nonzero(mask.any(axis=1))[0]
    if rows.size == 0:
        return 0.0, 0.0, 0.0
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - mask[rows, ::-1].argmax(axis=1)  # exclusive: the pixel's right corner
    xs = np.concatenate([first, first, last, last]).astype(float)
    ys = np.concatenate([rows, rows + 1, rows, rows + 1]).astype(float)
    points = np.stack([xs, ys], axis=1)
    try:
        convex = spatial.ConvexHull(points)
    except spatial.QhullError:  # one row or one column: the hull is flat
        return float(max(np.ptp(xs), np.ptp(ys))), float(min(np.ptp(xs), np.ptp(ys))), float(mask.sum())
    hull = points[convex.vertices]
    edges = np.roll(hull, -1, axis=0) - hull
    directions = edges / np.maximum(np.linalg.norm(edges, axis=1, keepdims=True), 1e-12)
    along = hull @ directions.T                               # (vertices, edges)
    across = hull @ np.stack([-directions[:, 1], directions[:, 0]], axis=1).T
    widths, lengths = np.ptp(across, axis=0), np.ptp(along, axis=0)
    best = int(np.argmin(widths))
    width, length = float(widths[best]), float(lengths[best])
    return (*((length, width) if length >= width else (width, length)), float(convex.volume))


@functools.lru_cache(maxsize=1)
def _libraries() -> tuple:
    """scipy.ndimage, scipy.spatial, skimage.measure/morphology/segmentation (the monitor extra).

    Looked up once: ``require`` goes through importlib on every call, 2 ms a frame in these loops.
    """
    return tuple(require(name, "monitor") for name in
                 ("scipy.ndimage", "scipy.spatial", "skimage.measure", "skimage.morphology", "skimage.segmentation"))


def split_region(mask: np.ndarray) -> list[np.ndarray]:
    """Pieces of a (reduced-resolution) region mask: a watershed of its distance transform.

    Example:
        >>> yy, xx = np.mgrid[:60, :100]
        >>> two = ((yy - 30) ** 2 + (xx - 30) ** 2 <= 400) | ((yy - 30) ** 2 + (xx - 68) ** 2 <= 400)
        >>> [int(p.sum()) > 1000 for p in split_region(two)]
        [True, True]
    """
    ndimage, _, _, morphology, segmentation = _libraries()
    padded = np.pad(mask, 1)
    distance = ndimage.distance_transform_edt(padded)
    # h-maxima on every other pixel of the distance map: a quarter of the work (it dominated the
    # measuring time), and a particle is at least 2 * MIN_PIECE_RADIUS px across at this scale
    coarse = distance[::2, ::2]
    peaks_coarse = morphology.h_maxima(coarse, SPLIT_DEPTH) & (coarse >= MIN_PIECE_RADIUS)
    markers_coarse, count = ndimage.label(peaks_coarse)
    if count < 2:
        return [mask]
    markers = np.zeros(distance.shape, dtype=np.int32)
    markers[::2, ::2] = markers_coarse
    pieces = segmentation.watershed(-distance, markers, mask=padded)[1:-1, 1:-1]
    return [pieces == k for k in range(1, count + 1) if (pieces == k).any()]


def particles_of(grey: np.ndarray, detector: str = "segment", max_side: int = MAX_PARTICLE_SIDE,
                 split: bool = True) -> list[MeasuredParticle]:
    """The measured particles of a frame (``tiles``: the tiles, with their sharpness only).

    Example:
        >>> frame = np.full((240, 320), 40, np.float32); frame[60:160, 80:240] += 120
        >>> [(round(p.length_px), round(p.width_px)) for p in particles_of(frame)]
        [(160, 100)]
    """
    if detector == "tiles":
        return [MeasuredParticle(r, sharpness=sharpness(grey, r.box)) for r in tiles(grey)]
    return measure_frame(grey, segment_frame(grey), max_side, split)


def measure_frame(grey: np.ndarray, found: Segmentation, max_side: int = MAX_PARTICLE_SIDE,
                  split: bool = True) -> list[MeasuredParticle]:
    """The particles of a segmented frame, merged regions split where they can be, measured.

    Args:
        grey: the frame, ``float32 (H, W)`` grey levels.
        found: the detector's regions and masks (:func:`segment_frame`).
        max_side: a piece with a longer side (px) is a ``cluster``, not measured.
        split: try to split regions that look merged (watershed).
    """
    particles: list[MeasuredParticle] = []
    masks: list[tuple[int, np.ndarray, tuple]] = []  # (index into particles, full-resolution mask, its hull)
    for region, label in zip(found.regions, found.labels_of):
        ys, xs = _half_slices(region.box)
        mask = found.labels[ys, xs] == label
        # refined whole first: most regions are one particle, and their hull is needed anyway
        pieces = [_refine_piece(grey, found.background, mask, (ys.start, xs.start), max_side)]
        particle, full, hull = pieces[0]
        if split and (particle.cluster or (full is not None and full.sum() < SPLIT_SOLIDITY * hull[2])):
            parts = split_region(mask)
            if len(parts) > 1:
                pieces = [_refine_piece(grey, found.background, part, (ys.start, xs.start), max_side) for part in parts]
        for particle, full, hull in pieces:
            particle.touching = particle.touching or len(pieces) > 1
            if not particle.cluster:  # the focus of what is kept only (a split region's whole is not)
                particle.sharpness = sharpness(grey, particle.region.box)
            if full is not None:
                masks.append((len(particles), full, hull))
            particles.append(particle)
    _add_measures(grey, particles, masks)
    return particles


def _half_slices(box: tuple[int, int, int, int]) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    return slice(y0 // SCALE, -(-y1 // SCALE)), slice(x0 // SCALE, -(-x1 // SCALE))


def _refine_piece(grey, background, piece: np.ndarray, origin: tuple[int, int],
                  max_side: int) -> tuple[MeasuredParticle, np.ndarray | None, tuple | None]:
    """A piece (reduced mask at ``origin`` of the reduced frame), its full-resolution mask (in its
    box) and :func:`hull_measures`; ``None`` for a cluster or a piece with no pixel above the edge level."""
    ndimage = _libraries()[0]
    rows, cols = np.nonzero(piece)
    py0, px0 = origin[0] + rows.min(), origin[1] + cols.min()
    piece = piece[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = grey.shape
    fy0, fx0 = py0 * SCALE, px0 * SCALE
    fy1, fx1 = min(fy0 + piece.shape[0] * SCALE, h), min(fx0 + piece.shape[1] * SCALE, w)
    box = (int(fx0), int(fy0), int(fx1), int(fy1))
    region = Region(box, int(piece.sum()) * SCALE * SCALE)
    if max(fx1 - fx0, fy1 - fy0) > max_side:
        return MeasuredParticle(region, touching=True, cluster=True), None, None
    up = np.repeat(np.repeat(piece, SCALE, axis=0), SCALE, axis=1)[:fy1 - fy0, :fx1 - fx0]
    under = np.repeat(np.repeat(background[py0:py0 + piece.shape[0], px0:px0 + piece.shape[1]], SCALE, axis=0),
                      SCALE, axis=1)[:fy1 - fy0, :fx1 - fx0]
    mask = up & (grey[fy0:fy1, fx0:fx1] - under >= EDGE_LEVEL)
    labels, count = ndimage.label(mask)
    if count > 1:  # noise specks and the edges of neighbours: keep the particle itself
        mask = labels == (1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, count + 1)))))
    mask = fill_holes(mask)
    particle = MeasuredParticle(region)
    return (particle, mask, hull_measures(mask)) if mask.any() else (particle, None, None)


def _add_measures(grey: np.ndarray, particles: list[MeasuredParticle], masks: list[tuple[int, np.ndarray, tuple]]) -> None:
    """Area, ECD and mean intensity by one ``regionprops_table`` over the frame; length, width, solidity from the hull."""
    if not masks:
        return
    measure = _libraries()[2]
    labels = np.zeros(grey.shape, dtype=np.int32)
    for k, (index, mask, _) in enumerate(masks, start=1):
        x0, y0, x1, y1 = particles[index].region.box
        labels[y0:y1, x0:x1][mask] = k  # pieces are disjoint: so are their masks
    # scikit-image's solidity draws each hull as an image (slow); the hull of the corners serves here
    table = measure.regionprops_table(labels, intensity_image=grey,
                                      properties=("label", "area", "equivalent_diameter_area", "intensity_mean"))
    for k, area, ecd, mean in zip(table["label"], table["area"], table["equivalent_diameter_area"],
                                  table["intensity_mean"]):
        index, _, (length, width, hull_area) = masks[k - 1]
        p = particles[index]
        p.area_px, p.ecd_px, p.mean_intensity = float(area), float(ecd), float(mean)
        p.length_px, p.width_px, p.aspect = length, width, length / max(width, 1.0)
        p.solidity = min(float(area) / max(hull_area, 1.0), 1.0)


def equivalent_diameter(area: float) -> float:
    """Diameter of the circle of the same area.

    Example:
        >>> round(equivalent_diameter(math.pi * 25), 6)
        10.0
    """
    return math.sqrt(4.0 * area / math.pi)
