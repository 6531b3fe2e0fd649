"""A client's re-implementation of crystalscope's preprocessing from the ONNX metadata alone.

Plain numpy, no Pillow resize: what a Node.js, C# or C++ client would write after reading
``preprocessing_spec`` (see ``Preprocessing.spec``). Pillow is used only to decode the PNG
into its raw pixels and alpha (any decoder gives the same bytes for a PNG).
"""

from __future__ import annotations

import numpy as np

PRECISION_BITS = 22  # "weights * 2**22 ... shifts right by 22"


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _bicubic(x: float, a: float = -0.5) -> float:
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


KERNELS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


def _weights(in_size: int, out_size: int, kernel: str) -> list[tuple[int, np.ndarray]]:
    """Per output pixel: first input tap and the fixed-point weights (half-pixel centres, antialias)."""
    filt, support = KERNELS[kernel]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    taps = []
    for xx in range(out_size):
        centre = (xx + 0.5) * scale
        xmin = max(int(centre - support + 0.5), 0)
        xmax = min(int(centre + support + 0.5), in_size)
        w = np.array([filt((x + xmin - centre + 0.5) / filterscale) for x in range(xmax - xmin)])
        if w.sum() != 0:
            w = w / w.sum()
        fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << PRECISION_BITS)),
                         np.trunc(0.5 + w * (1 << PRECISION_BITS))).astype(np.int64)
        taps.append((xmin, fixed))
    return taps


def resample_axis(image: np.ndarray, out_size: int, axis: int, kernel: str) -> np.ndarray:
    """One separable pass over ``axis`` of a uint8 (H, W, 3) image, 8-bit fixed point."""
    moved = np.moveaxis(image.astype(np.int64), axis, 0)
    out = np.empty((out_size,) + moved.shape[1:], dtype=np.int64)
    for i, (start, fixed) in enumerate(_weights(moved.shape[0], out_size, kernel)):
        acc = (1 << (PRECISION_BITS - 1)) + np.tensordot(fixed, moved[start:start + len(fixed)], axes=1)
        out[i] = np.clip(acc >> PRECISION_BITS, 0, 255)
    return np.moveaxis(out, 0, axis).astype(np.uint8)


def resize(image: np.ndarray, width: int, height: int, kernel: str) -> np.ndarray:
    """Horizontal pass first, then vertical; a pass is skipped when that side is unchanged."""
    if image.shape[1] != width:
        image = resample_axis(image, width, 1, kernel)
    if image.shape[0] != height:
        image = resample_axis(image, height, 0, kernel)
    return image


def composite_on_black(rgba: np.ndarray) -> np.ndarray:
    """RGBA over opaque black, in the integer arithmetic of Pillow's alpha_composite."""
    src = rgba[..., :3].astype(np.int64)
    alpha = rgba[..., 3:4].astype(np.int64)
    t = src * alpha * 128 + (0x80 << 7)  # coef1 = alpha * 2**7 when the background is opaque
    return ((((t >> 8) + t) >> 8) >> 7).astype(np.uint8)


def preprocess(pixels: np.ndarray, spec: dict, image_size: int) -> np.ndarray:
    """Decoded pixels (H, W, 3 or 4 uint8) -> float32 (1, 3, S, S) model input, from the spec alone."""
    rgb = composite_on_black(pixels) if pixels.shape[-1] == 4 else pixels
    kernel = spec["resize"]["filter"]
    if spec["resize"]["policy"] == "stretch":
        square = resize(rgb, image_size, image_size, kernel)
    else:
        h, w = rgb.shape[:2]
        scale = image_size / max(w, h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))  # round half to even
        pad = int(spec["resize"]["pad_value"].split()[0])
        square = np.full((image_size, image_size, 3), pad, dtype=np.uint8)
        left, top = (image_size - new_w) // 2, (image_size - new_h) // 2
        square[top:top + new_h, left:left + new_w] = resize(rgb, new_w, new_h, kernel)
    norm = spec["normalize"]
    x = square.astype(np.float32) / 255.0
    x = (x - np.asarray(norm["mean"], dtype=np.float32)) / np.asarray(norm["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])
