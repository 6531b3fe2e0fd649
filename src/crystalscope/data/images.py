"""Finding and decoding images: the one place that turns any file into an RGB picture.

Training, evaluation, export checks and both prediction back ends decode through
:func:`load_rgb`, so a greyscale, RGBA, palette or 16-bit file is converted the same way
everywhere. Which files count as images, and which folders as classes, is decided by
:mod:`crystalscope.data.layout` (re-exported here for the modules that import it from here).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crystalscope.errors import CrystalscopeError

DEFAULT_MAX_PIXELS = 25_000_000
EXIF_ORIENTATION = 0x0112
# our own limit is checked from the header first; Pillow's bomb check stays as a second line
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, DEFAULT_MAX_PIXELS)


class ImageReadError(CrystalscopeError):
    """A file could not be decoded as an image."""


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a 16-bit, 32-bit integer or float image to 0..255 uint8."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.nan_to_num(array.astype(np.float64))
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(array * scale, 0, 255).round().astype(np.uint8)
    # integer images: 16-bit microscope TIFFs use the full 0..65535 range
    info_max = 65535.0 if array.max(initial=0) > 255 else 255.0
    return np.clip(array.astype(np.float64) * (255.0 / info_max), 0, 255).round().astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB the same way everywhere.

    Transparent pixels are composited onto black (the probe's dark background); greyscale
    and 16-bit images are scaled to 0..255 and copied into three equal channels.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("L", "1"):
        return img.convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        grey = _to_uint8(np.asarray(img))
        if grey.ndim == 3:
            grey = grey[..., 0]
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


def load_rgb(source: str | os.PathLike | Image.Image) -> Image.Image:
    """Decode a file (or take a PIL image) and return it as 8-bit RGB.

    Raises:
        ImageReadError: the file is missing, not an image, or truncated/corrupt.

    Example:
        >>> load_rgb("../shared/real_samples/CEX (1).png").size  # doctest: +SKIP
        (151, 151)
    """
    if isinstance(source, Image.Image):
        return to_rgb(upright(source))
    path = Path(source)
    try:
        with open_regular(path) as handle, Image.open(handle) as img:
            check_pixels(img.size, path)  # from the header: a huge image is refused before any decode
            img.load()  # forces a full decode so truncated files fail here, not later
            return to_rgb(upright(img))
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not a readable image file") from None
    except Image.DecompressionBombError:
        raise ImageReadError(f"{path}: image is far above the limit of {max_pixels():,} pixels (set "
                             "CRYSTALSCOPE_MAX_PIXELS to raise it, or downscale the file)") from None
    except MemoryError:
        raise ImageReadError(f"{path}: not enough memory to decode this image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"{path}: corrupt or truncated image ({exc})") from None


#: what a non-regular file is, for the error line (``stat.S_IS*`` test, words)
_NOT_REGULAR = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading only when it is a regular file (following symbolic links).

    Why: reading a FIFO waits for a writer forever and ``/dev/zero`` never ends, so a decoder
    that opened them would hang the whole command. The file is opened non-blocking and
    checked with ``fstat`` on the open descriptor (no window between a check and the open).

    Raises:
        ImageReadError: missing, a dangling or looping symbolic link, a folder, FIFO, device
            or socket, or not readable; the line names ``path``.

    Example:
        >>> open_regular("/dev/zero")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ImageReadError: /dev/zero: a character device, not a regular file
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ImageReadError(f"{path}: {_open_failure(path, exc)}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((words for test, words in _NOT_REGULAR if test(mode)), "a special file")
        raise ImageReadError(f"{path}: {kind}, not a regular file")
    return os.fdopen(fd, "rb")


def _open_failure(path: str | os.PathLike, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "a symbolic link loop: fix or remove the link"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return f"a dangling symbolic link (its target {os.readlink(path)} does not exist)"
    if exc.errno == errno.ENOENT:
        return "file not found"
    if exc.errno == errno.ENXIO:
        return "a socket or a device without a reader, not a regular file"
    return f"cannot open the file ({exc.strerror or exc})"


def max_pixels() -> int:
    """The largest image (width x height) any command decodes: 25 Mpx, or ``$CRYSTALSCOPE_MAX_PIXELS``.

    Why: the crops are ~150-230 px and a full microscope frame a few Mpx; a 12000 x 12000 PNG
    would cost ~1.5 GB of memory per decoding worker. Refusing it from the header keeps every
    command's memory bounded (a too-large file is an error row in predict, a skipped file with
    its reason in split and audit).
    """
    try:
        return max(1, int(os.environ.get("CRYSTALSCOPE_MAX_PIXELS", DEFAULT_MAX_PIXELS)))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def check_pixels(size: tuple[int, int], path: str | os.PathLike) -> None:
    """Raise :class:`ImageReadError` when ``size`` (w, h) is above :func:`max_pixels`."""
    width, height = size
    if width * height > max_pixels():
        raise ImageReadError(f"{path}: image is {width} x {height} pixels, above the limit of {max_pixels():,} "
                             "(set CRYSTALSCOPE_MAX_PIXELS to raise it, or downscale the file)")


def upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (a phone or camera JPEG stored sideways) once, here.

    Example:
        >>> upright(Image.new("RGB", (4, 2))).size
        (4, 2)
    """
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return img
    return ImageOps.exif_transpose(img) if orientation not in (0, 1) else img
