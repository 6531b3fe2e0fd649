"""Uploads (serve/uploads.py): every bad-input class is a 4xx JSON error; names are labels, not paths."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from crystalscope.serve.uploads import display_name  # noqa: E402
from serve_requests import assert_refused, png_bytes, upload  # noqa: E402


# ---- every bad-input class is a 4xx JSON error ----------------------------------------------


def test_wrong_type_is_refused_by_content_not_name(client):
    assert_refused(client.post("/api/predict", files=[upload("crystal.png", b"GIF89a not really")]),
                   415, "crystal.png", "content")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    assert_refused(client.post("/api/predict", files=[upload("crystal.png", gif.getvalue())]), 415)


def test_truncated_image_is_refused(client):
    data = png_bytes((200, 200))
    assert_refused(client.post("/api/predict", files=[upload("cut.png", data[: len(data) // 2])]),
                   422, "cut.png", "truncated")


def test_empty_file_and_empty_form_are_refused(client):
    assert_refused(client.post("/api/predict", files=[upload("empty.png", b"")]), 400, "empty file")
    assert_refused(client.post("/api/predict", data={"note": "no files"}), 400, "files")
    assert_refused(client.post("/api/predict"), 400, "files")
    assert_refused(client.post("/api/predict", json={"files": ["a.png"]}), 400, "files")


def test_too_many_pixels_is_refused_before_decoding(client):
    assert_refused(client.post("/api/predict", files=[upload("huge.png", png_bytes((1001, 1000)))]),
                   413, "huge.png", "1001x1000")


def test_too_many_pixels_in_one_request_is_refused(client):
    each = png_bytes((1000, 800))  # 0.8 MP: under the per-image limit, two are over the request's
    assert client.post("/api/predict", files=[upload("a.png", each)]).status_code == 200
    assert_refused(client.post("/api/predict", files=[upload("a.png", each), upload("b.png", each)]),
                   413, "1,500,000 pixels together")


def test_oversized_request_is_refused(client):
    big = os.urandom(2_100_000)
    assert_refused(client.post("/api/predict", files=[upload("big.png", big)]), 413, "limit")
    too_many = [upload(f"{i}.png", png_bytes()) for i in range(9)]
    assert_refused(client.post("/api/predict", files=too_many), 413, "9 files")


def test_oversized_chunked_upload_without_length_is_cut_off(client):
    def body():
        yield b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 100_000

    response = client.post("/api/predict", content=body(),
                           headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_refused(response, 413, "limit")


def test_malformed_multipart_and_bad_format_are_4xx(client):
    response = client.post("/api/predict", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert 400 <= response.status_code < 500 and "error" in response.json()
    assert_refused(client.post("/api/predict?format=xml", files=[upload("a.png", png_bytes())]), 422, "format")


def test_display_name_is_a_label_not_a_path():
    assert display_name("../../etc/passwd", 0) == "passwd"
    assert display_name("C:\\crops\\PG (1).png", 0) == "PG (1).png"
    assert display_name("a\nb.png", 0) == "ab.png"
    assert display_name(None, 4) == "upload-4"
