"""The one preprocessing object shared by training, evaluation, export and prediction.

A :class:`Preprocessing` travels inside every checkpoint and every ONNX file, so the resize
policy, interpolation, input size and normalisation used at prediction time are exactly the
ones used in training. It needs only numpy and Pillow (the ONNX back end imports no torch).

Two stages:
1. :meth:`Preprocessing.resize_uint8` decodes-independent geometry: RGB PIL image ->
   ``uint8`` array ``(size, size, 3)``. Training caches this stage.
2. :meth:`Preprocessing.normalize` turns uint8 ``(N, H, W, 3)`` into float32 ``(N, 3, H, W)``
   with the model's mean and std. The torch training path does the same arithmetic on
   tensors with the same constants (see :meth:`Preprocessing.normalize_torch`).
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from crystalscope.data.images import load_rgb
from crystalscope.errors import CrystalscopeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_POLICIES = ("stretch", "pad")
_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """Geometry and normalisation of a model's input.

    Attributes:
        image_size: side of the square model input in pixels.
        mean, std: per-channel normalisation on 0..1 values (RGB order).
        resize: ``stretch`` (distort to a square, as the reference study) or ``pad``
            (keep the aspect ratio and letterbox with ``pad_value``, so a crop's shape
            cannot leak through distortion).
        interpolation: Pillow resampling filter name.
        pad_value: grey level (0..255) of the letterbox bars.

    Example:
        >>> pre = Preprocessing(image_size=64)
        >>> pre.prepare(["CEX (1).png"]).shape  # doctest: +SKIP
        (1, 3, 64, 64)
    """

    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "stretch"
    interpolation: str = "bilinear"
    pad_value: int = 0

    def __post_init__(self):
        if self.resize not in RESIZE_POLICIES:
            raise CrystalscopeError(
                f"--resize {self.resize!r} is not known: use one of {', '.join(RESIZE_POLICIES)}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise CrystalscopeError(
                f"interpolation {self.interpolation!r} is not known: use one of "
                f"{', '.join(_INTERPOLATIONS)}"
            )
        if int(self.image_size) < 8:
            raise CrystalscopeError(f"--image-size {self.image_size} is too small: use 8 or more")
        for key, values in (("mean", self.mean), ("std", self.std)):
            values = [float(v) for v in values]  # (TypeError for a non-number, as before)
            # a std of 0 divides by zero: every image would become inf/NaN and get one label
            if len(values) != 3 or not all(np.isfinite(values)) or (key == "std" and min(values) <= 0):
                raise CrystalscopeError(f"preprocessing {key} {values} must be 3 finite numbers (R, G, B)"
                                        + (", each > 0" if key == "std" else ""))
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    # -- serialisation (checkpoints, ONNX metadata) --------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def spec(self) -> dict:
        """Everything a client in another language needs to reproduce the input exactly.

        Stored in the ONNX metadata (``preprocessing_spec``). Tested by a plain-numpy
        re-implementation that reads only this dict (tests/test_reliability.py).

        Example:
            >>> Preprocessing(image_size=64).spec()["resize"]["filter"]
            'bilinear'
        """
        filters = {"nearest": "nearest (no antialias)", "bilinear": "bilinear", "bicubic": "bicubic",
                   "lanczos": "lanczos"}
        return {
            "version": 1,
            "decode": {
                "alpha": "composite onto opaque black (0,0,0), then drop alpha (RGBA, LA, PA and palette with transparency)",
                "greyscale": "copy the grey value into R, G and B (modes L and 1)",
                "high_bit_depth": "16/32-bit integer: value * 255 / 65535 when any value > 255 else value; "
                                  "float: value * 255 when max <= 1; then round half to even, clip 0..255",
                "exif_orientation": "applied (EXIF tag 0x0112) before anything else",
                "max_pixels": "images above the decoder's pixel limit are refused, not resized",
            },
            "resize": {
                "library": f"Pillow {Image.__version__} Image.resize (reducing_gap=None)",
                "policy": self.resize, "filter": filters[self.interpolation],
                "kernel": {"bilinear": "triangle, support 1", "bicubic": "Keys cubic a=-0.5, support 2",
                           "lanczos": "Lanczos-3, support 3", "nearest": "nearest"}[self.interpolation],
                "antialias": "yes: when downscaling, the kernel is stretched by the scale factor (support * scale)"
                             if self.interpolation != "nearest" else "no",
                "pixel_centre": "half-pixel: output x samples input (x + 0.5) * in_size / out_size, "
                                "tap weights filter((tap - centre + 0.5) / max(scale, 1)), normalised to sum 1; "
                                "taps from int(centre - support + 0.5) to int(centre + support + 0.5), clamped to the image",
                "passes": "separable: horizontal pass first, then vertical; a pass is skipped when that side is "
                          "unchanged",
                "arithmetic": "8-bit fixed point: weights * 2**22 rounded half away from zero, each pass "
                              "accumulates from 2**21, shifts right by 22 and clips to 0..255 (uint8 between passes)",
                "scaled_size": ("stretch: image_size x image_size" if self.resize == "stretch" else
                                "pad: scale = image_size / max(w, h); new side = max(1, round_half_even(side * scale)) "
                                "in float64"),
                "pad_offset": "left = (image_size - new_w) // 2, top = (image_size - new_h) // 2 (floor)",
                "pad_value": f"{self.pad_value} on the 0..255 scale, same in R, G, B, before normalisation",
            },
            "normalize": {"order": "x = uint8 / 255 (float32); x = (x - mean) / std per channel; HWC -> CHW",
                          "mean": list(self.mean), "std": list(self.std), "channels": "RGB",
                          "dtype": "float32", "layout": "NCHW"},
        }

    # -- stage 1: geometry ---------------------------------------------------------------
    def resize_image(self, img: Image.Image) -> Image.Image:
        """RGB PIL image -> square RGB PIL image of ``image_size``."""
        size = self.image_size
        method = _INTERPOLATIONS[self.interpolation]
        if self.resize == "stretch":
            return img.resize((size, size), method)
        left, top, new_w, new_h = self.content_box(img.size)
        resized = img.resize((new_w, new_h), method)
        canvas = Image.new("RGB", (size, size), (self.pad_value,) * 3)
        canvas.paste(resized, (left, top))
        return canvas

    def content_box(self, original_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """Where an image of ``(width, height)`` lands in the model input: ``(left, top, width, height)``.

        The whole square for ``stretch``; the letterboxed area for ``pad``. The one rule for
        this geometry, shared by :meth:`resize_image` and anything mapping model-input pixels
        back onto the original image (Grad-CAM overlays).

        Example:
            >>> Preprocessing(image_size=100, resize="pad").content_box((200, 100))
            (0, 25, 100, 50)
        """
        size = self.image_size
        if self.resize == "stretch":
            return 0, 0, size, size
        w, h = original_size
        scale = size / max(w, h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        return (size - new_w) // 2, (size - new_h) // 2, new_w, new_h

    def resize_uint8(self, source: "str | os.PathLike | Image.Image") -> np.ndarray:
        """Decode (any mode) and resize: returns ``uint8`` array ``(H, W, 3)``."""
        return np.asarray(self.resize_image(load_rgb(source)), dtype=np.uint8)

    # -- stage 2: normalisation ----------------------------------------------------------
    def normalize(self, batch_uint8: np.ndarray) -> np.ndarray:
        """``uint8 (N, H, W, 3)`` -> ``float32 (N, 3, H, W)`` normalised.

        uint8 input goes through a 256-entry table per channel holding exactly
        :func:`normalize_arithmetic` of every grey level, so the result is bit-identical to the
        arithmetic at about a third of its cost (it was as costly as decoding a PNG in
        ``predict``). Other dtypes take the arithmetic itself.
        """
        batch = np.asarray(batch_uint8)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            return normalize_arithmetic(batch, self.mean, self.std)
        table = _normalize_table(self.mean, self.std)
        planes = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        out = np.empty(planes.shape, dtype=np.float32)
        for channel in range(3):
            np.take(table[channel], planes[:, channel], out=out[:, channel], mode="clip")
        return out

    def normalize_torch(self, batch_uint8):
        """Torch twin of :meth:`normalize`: ``uint8 (N, H, W, 3)`` or ``(N, 3, H, W)`` tensor
        -> float ``(N, 3, H, W)``. Same constants, same order of operations.

        The mean/std tensors are cached per device: building them with
        ``torch.tensor(..., device=cuda)`` every step would be a blocking host-to-device copy,
        i.e. a host-device synchronisation in every training step.
        """
        x = batch_uint8
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = x.float() / 255.0
        mean, std = _torch_constants(self.mean, self.std, x.device)
        return (x - mean) / std

    def prepare(self, sources: Sequence) -> np.ndarray:
        """Files or PIL images -> model-ready ``float32 (N, 3, H, W)``."""
        return self.normalize(np.stack([self.resize_uint8(s) for s in sources]))


def normalize_arithmetic(batch: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """The normalisation itself: ``(x / 255 - mean) / std`` in float32, NHWC -> NCHW.

    Example:
        >>> normalize_arithmetic(np.full((1, 1, 1, 3), 255, np.uint8), (0.5,) * 3, (0.5,) * 3).ravel().tolist()
        [1.0, 1.0, 1.0]
    """
    x = np.asarray(batch, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple, std: tuple) -> np.ndarray:
    """``(3, 256)`` float32: the normalised value of every uint8 level, per channel."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)[None, None]  # (1, 1, 256, 3)
    return np.ascontiguousarray(normalize_arithmetic(levels, mean, std)[0, :, 0, :])


@functools.lru_cache(maxsize=16)
def _torch_constants(mean: tuple, std: tuple, device):
    import torch

    return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1))
