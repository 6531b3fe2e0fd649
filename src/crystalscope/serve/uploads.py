"""Turning uploaded bytes into images, safely.

The one rule for what the server accepts: the image type is read from the content (Pillow's
decoders, restricted to the formats ``predict`` reads), never from the client's file name;
the pixel count is checked from the header before the full decode, so a small PNG that
inflates to gigapixels is refused before it costs memory. Nothing is written to disk under
the client's file name: bytes are decoded in memory, and the name is only a label.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from crystalscope.data.layout import IMAGE_EXTENSIONS
from crystalscope.errors import CrystalscopeError
from crystalscope.runtime import first_line

#: Pillow format names accepted by content: those of ``IMAGE_EXTENSIONS`` (what ``predict``
#: reads), so the API and the command line accept the same images. ("PNG", "JPEG", "TIFF", "BMP")
ALLOWED_FORMATS = tuple(dict.fromkeys(Image.registered_extensions()[ext] for ext in IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class ServeLimits:
    """What one request may carry.

    Attributes:
        max_request_bytes: the whole request body (all files together).
        max_files: images per request.
        max_pixels: width x height of one image, checked before decoding.
        max_request_pixels: all images of one request together. Decoded RGB costs 3 bytes a
            pixel, so this bounds a request's memory whatever the files compress to (64 small
            PNGs of 25 MP each would otherwise decode to 4.8 GB).

    Example:
        >>> ServeLimits(max_files=8).max_files
        8
    """

    max_request_bytes: int = 32 * 1024 * 1024
    max_files: int = 64
    max_pixels: int = 25_000_000
    max_request_pixels: int = 100_000_000

    def __post_init__(self):
        for name in ("max_request_bytes", "max_files", "max_pixels", "max_request_pixels"):
            if int(getattr(self, name)) < 1:
                option = "--" + name.replace("_", "-")
                raise CrystalscopeError(f"{option} {getattr(self, name)} must be 1 or more")


class UploadError(CrystalscopeError):
    """An upload the server refuses; ``status_code`` is the HTTP status (4xx) to answer."""

    def __init__(self, message: str, status_code: int = 422):
        super().__init__(message)
        self.status_code = status_code


def display_name(client_name: str | None, index: int) -> str:
    """A label for an upload: the client's base name without folders or control characters.

    It is only ever shown (JSON, CSV, page), never used as a path.

    Example:
        >>> display_name("C:\\\\crops\\\\CEX (1).png", 0)
        'CEX (1).png'
        >>> display_name("", 3)
        'upload-3'
    """
    name = re.split(r"[\\/]", client_name or "")[-1]
    name = re.sub(r"[\x00-\x1f\x7f]", "", name).strip()[:255]
    return name or f"upload-{index}"


def decode_upload(data: bytes, name: str, limits: ServeLimits) -> Image.Image:
    """Decode one uploaded file fully, in memory, after the type and pixel checks.

    Raises:
        UploadError: empty file (400), not an allowed image type (415), too many pixels
            (413), or truncated/corrupt (422). The message starts with ``name``.

    Example:
        >>> decode_upload(open("CEX (1).png", "rb").read(), "CEX (1).png", ServeLimits()).size  # doctest: +SKIP
        (151, 151)
    """
    if not data:
        raise UploadError(f"{name}: empty file", 400)
    try:
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise UploadError(f"{name}: too many pixels (the limit is {limits.max_pixels:,})", 413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UploadError(f"{name}: not a {', '.join(ALLOWED_FORMATS[:-1])} or {ALLOWED_FORMATS[-1]} image (the type is read from the "
                          "content, not the name)", 415) from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise UploadError(f"{name}: {width}x{height} is too many pixels (the limit is "
                          f"{limits.max_pixels:,}); crop or downscale it", 413)
    try:
        img.load()  # the full decode here, so a truncated file fails as an upload error
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = first_line(exc, limit=120)
        raise UploadError(f"{name}: corrupt or truncated image ({reason})", 422) from None
    return img
