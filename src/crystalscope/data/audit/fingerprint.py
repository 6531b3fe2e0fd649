"""Fingerprints: what the audit keeps of one decoded image, and the dihedral perceptual hash.

Every image is decoded once into an :class:`ImageRecord`: size, intensity statistics and a
*dihedral perceptual hash* (a 64-bit DCT hash of each of the 8 rotations/mirror images of an
exactly-equivariant 32 x 32 thumbnail), so rotated and mirrored copies get equal hashes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from crystalscope.data.images import ImageReadError, load_rgb
from crystalscope.runtime import first_line

THUMB_SIZE = 32
HASH_SIDE = 8  # 8 x 8 lowest DCT frequencies -> 64 bits
HISTOGRAM_BINS = 64


@dataclass
class ImageRecord:
    """What the audit keeps of one decoded image (the pixels themselves are not kept)."""

    path: Path
    width: int = 0
    height: int = 0
    mean_intensity: float = 0.0
    std_intensity: float = 0.0
    #: (8,) uint64: the perceptual hash of each dihedral view; [0] is the image as stored.
    phash: np.ndarray | None = None
    #: (HISTOGRAM_BINS,) counts of grey levels.
    histogram: np.ndarray | None = None
    error: str | None = None
    #: Pixel-checked verdicts ``(same up to rotation/mirror, identical)`` for hash candidates
    #: decoded in the same worker chunk, so most pairs need no second decode.
    verified: dict[Path, tuple[bool, bool]] = field(default_factory=dict)

    @property
    def readable(self) -> bool:
        return self.error is None


def dihedral_views(array: np.ndarray) -> Iterator[np.ndarray]:
    """The 8 rotations / mirror images of an ``(H, W[, C])`` array (identity first).

    Example:
        >>> len(list(dihedral_views(np.zeros((3, 5)))))
        8
    """
    for k in range(4):
        yield np.rot90(array, k)
    mirrored = array[:, ::-1]
    for k in range(4):
        yield np.rot90(mirrored, k)


def box_reduce(values: np.ndarray, axis: int, size: int = THUMB_SIZE) -> np.ndarray:
    """Area-average ``axis`` (length n) down to ``size`` bins, exactly, in integer units.

    Positions are scaled by ``size`` so every bin edge ``a * n / size`` falls on an integer;
    the integral up to an edge is ``size * cumsum + remainder * pixel``. Integer arithmetic
    makes the result *exactly* equivariant: the thumbnail of a rotated or mirrored image is
    the rotated or mirrored thumbnail, bit for bit, so true dihedral copies get identical
    hashes. (No BLAS matmul either: on a busy 2-core machine its threads cost 20 ms a call.)
    """
    values = np.moveaxis(values, axis, 0)
    n = values.shape[0]
    # int64 only once the sums can outgrow int32 (the second pass of large images)
    dtype = np.int32 if values.dtype == np.uint8 else np.int64
    cumulative = np.zeros((n + 1,) + values.shape[1:], dtype=dtype)
    np.cumsum(values, axis=0, dtype=dtype, out=cumulative[1:])
    pixel, remainder = np.divmod(np.arange(size + 1) * n, size)
    partial = values[np.minimum(pixel, n - 1)].astype(dtype)  # remainder is 0 where pixel == n
    integral = size * cumulative[pixel] + remainder.reshape((-1,) + (1,) * (values.ndim - 1)) * partial
    return np.moveaxis(np.diff(integral, axis=0), 0, axis)


@lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    x = np.arange(THUMB_SIZE)
    u = np.arange(HASH_SIDE)[:, None]
    return np.cos(np.pi * (2 * x[None, :] + 1) * u / (2 * THUMB_SIZE))


def grey_thumbnail(grey: np.ndarray) -> np.ndarray:
    """A ``32 x 32`` area-averaged (unnormalised, integer-valued) thumbnail of a grey image."""
    return box_reduce(box_reduce(grey, 0).astype(np.int64), 1).astype(np.float64)


def dihedral_phash(image: np.ndarray) -> np.ndarray:
    """The 64-bit DCT perceptual hash of each of the 8 dihedral views, as ``(8,) uint64``.

    ``dihedral_phash(view)[0]`` equals one entry of ``dihedral_phash(image)`` for every
    rotation/mirror ``view`` of ``image``, so comparing one hash against all 8 finds
    rotated and mirrored copies.

    Args:
        image: ``(H, W, 3)`` RGB or ``(H, W)`` grey array.

    Example:
        >>> img = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
        >>> int(dihedral_phash(np.rot90(img))[0]) in set(dihedral_phash(img).tolist())
        True
    """
    grey = image.sum(axis=2, dtype=np.int64) if image.ndim == 3 else image
    thumb = grey_thumbnail(grey)
    dct = _dct_matrix()
    views = np.stack([np.ascontiguousarray(v) for v in dihedral_views(thumb)])
    coeffs = (dct @ views @ dct.T).reshape(8, -1)
    median = np.median(coeffs[:, 1:], axis=1, keepdims=True)
    # a tolerance keeps flat images (all AC coefficients ~1e-12) from hashing float noise
    tolerance = 1e-9 * (np.abs(coeffs[:, :1]) + 1.0)
    bits = coeffs > median + tolerance
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).ravel()


def fingerprint(path: Path) -> tuple[ImageRecord, np.ndarray | None]:
    """Decode one image into its record; the RGB pixels come back too (None if unreadable).

    Example:
        >>> record, rgb = fingerprint(Path("pg/PG (1).png"))  # doctest: +SKIP
        >>> record.readable, rgb.shape  # doctest: +SKIP
        (True, (180, 201, 3))
    """
    try:
        image = load_rgb(path)
    except ImageReadError as exc:
        return ImageRecord(path=path, error=first_line(exc, limit=None)), None
    # intensity = ITU-R 601 luma (PIL "L"); per-pixel, so rotations and mirrors commute with it
    grey = np.asarray(image.convert("L"))
    counts = np.bincount(grey.ravel(), minlength=256)
    levels = np.arange(256, dtype=np.float64)
    mean = float(levels @ counts) / grey.size
    variance = float((levels**2) @ counts) / grey.size - mean**2
    record = ImageRecord(
        path=path, width=image.width, height=image.height,
        mean_intensity=mean, std_intensity=math.sqrt(max(0.0, variance)),
        phash=dihedral_phash(grey),
        histogram=counts.reshape(HISTOGRAM_BINS, -1).sum(axis=1),
    )
    return record, np.asarray(image)
