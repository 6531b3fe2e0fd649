"""Training augmentation done in batches on the device (GPU or CPU), no per-image Python loop.

The reference study used Keras' ImageDataGenerator (rotation 30 degrees, shifts 0.2, zoom 0.3,
horizontal and vertical flips, ``fill_mode="nearest"``). Here one affine matrix per sample
is drawn on the device and applied with ``F.affine_grid`` / ``F.grid_sample`` to the whole
batch at once; ``padding_mode="border"`` repeats edge pixels like Keras' ``nearest`` fill.
Normalisation happens after the warp (the same result as before it: bilinear weights sum to 1
and border padding copies pixels, so the per-channel affine normalisation commutes).
The random numbers come from a seeded ``torch.Generator``, so a run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crystalscope.data.transforms import Preprocessing


@dataclass(frozen=True)
class AugmentSpec:
    """Ranges of the random training transforms.

    Attributes:
        rotation: degrees; angle uniform in ``[-rotation, rotation]``.
        shift: fraction of the image side; shift uniform in ``[-shift, shift]`` per axis.
        zoom: scale uniform in ``[1 - zoom, 1 + zoom]``.
        hflip, vflip: mirror with probability 0.5.
    """

    rotation: float = 30.0
    shift: float = 0.2
    zoom: float = 0.3
    hflip: bool = True
    vflip: bool = True


def random_affine(n: int, spec: AugmentSpec, *, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(n, 2, 3)`` matrices for ``F.affine_grid`` (output -> input normalised coordinates)."""
    u = torch.rand(n, 6, device=device, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(spec.rotation)
    scale = 1 + (u[:, 1] * 2 - 1) * spec.zoom
    # normalised coordinates span 2 units per side, so a shift of 0.2 sides is 0.4 units
    tx = (u[:, 2] * 2 - 1) * spec.shift * 2
    ty = (u[:, 3] * 2 - 1) * spec.shift * 2
    sx = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if spec.hflip else torch.ones_like(scale)
    sy = torch.where(u[:, 5] < 0.5, -1.0, 1.0) if spec.vflip else torch.ones_like(scale)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([
        torch.stack([cos * sx, -sin * sy, tx], dim=1),
        torch.stack([sin * sx, cos * sy, ty], dim=1),
    ], dim=1)
    return theta


def augment_batch(batch_uint8: torch.Tensor, preprocessing: Preprocessing, spec: AugmentSpec, *,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random affine + flips on a uint8 batch, then the model's normalisation.

    Args:
        batch_uint8: ``uint8 (N, H, W, 3)`` tensor on any device.
        preprocessing: supplies mean and std (:meth:`Preprocessing.normalize_torch`).
        spec: the random ranges.
        generator: seeded generator on the batch's device (reproducible runs).

    Returns:
        float32 ``(N, 3, H, W)``, normalised, on the batch's device.

    Example:
        >>> x = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
        >>> augment_batch(x, Preprocessing(image_size=32), AugmentSpec()).shape
        torch.Size([4, 3, 32, 32])
    """
    x = batch_uint8.permute(0, 3, 1, 2).float()
    theta = random_affine(x.shape[0], spec, device=x.device, generator=generator)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return preprocessing.normalize_torch(x)
