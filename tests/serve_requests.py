"""Request helpers shared by the serve tests: tiny uploads and the check of a refusal."""

from __future__ import annotations

import io

from PIL import Image


def png_bytes(size=(40, 30), value=90) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value // 2, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(name: str, data: bytes, mime: str = "image/png"):
    return ("files", (name, data, mime))


def assert_refused(response, status: int, *words: str) -> None:
    """A 4xx JSON answer whose ``error`` names every one of ``words``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    for word in words:
        assert word in message, message
