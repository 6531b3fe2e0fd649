"""`crystalscope serve`: every endpoint and every bad-input class through FastAPI's TestClient."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
from fastapi.testclient import TestClient  # noqa: E402

from crystalscope import Predictor  # noqa: E402
from crystalscope.cli import app as cli_app  # noqa: E402
from crystalscope.errors import CrystalscopeError  # noqa: E402
from crystalscope.serve.app import create_app, prediction_json  # noqa: E402
from crystalscope.serve.server import check_bind, is_loopback  # noqa: E402
from crystalscope.serve.uploads import ServeLimits, display_name  # noqa: E402
from tiny_onnx import TEMPERATURE, tiny_onnx_model  # noqa: E402

STATIC = Path(__file__).resolve().parents[1] / "src" / "crystalscope" / "serve" / "static"


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    return tiny_onnx_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def predictor(onnx_model) -> Predictor:
    return Predictor.load(onnx_model)


@pytest.fixture
def client(predictor) -> TestClient:
    return TestClient(create_app(predictor, ServeLimits(max_request_bytes=2_000_000, max_files=8,
                                                        max_pixels=1_000_000, max_request_pixels=1_500_000)))


def png_bytes(size=(40, 30), value=90) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value // 2, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(name: str, data: bytes, mime: str = "image/png"):
    return ("files", (name, data, mime))


def assert_refused(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    for word in words:
        assert word in message, message


# ---- the done-when check: same numbers as `crystalscope predict` ---------------------------


def test_api_predict_equals_cli_predict_on_real_samples(client, onnx_model, real_samples, tmp_path):
    out = tmp_path / "cli.csv"
    result = CliRunner().invoke(cli_app, ["predict", str(onnx_model), str(real_samples), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cli_rows = list(csv.DictReader(open(out, newline="")))
    files = [upload(Path(r["path"]).name, Path(r["path"]).read_bytes()) for r in cli_rows]
    response = client.post("/api/predict", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [Path(r["path"]).name for r in cli_rows]
    expected = {Path(p.path).name: p for p in Predictor.load(onnx_model).predict(sorted(real_samples.glob("*.png")))}
    for api_row, cli_row in zip(results, cli_rows):
        assert api_row["status"] == cli_row["status"] == "ok"
        assert api_row["predicted"] == cli_row["predicted"]
        for name in ("cex", "pg"):
            assert abs(api_row["probabilities"][name] - float(cli_row[f"p_{name}"])) <= 1e-6  # CSV has 6 decimals
            assert api_row["probabilities"][name] == pytest.approx(
                expected[api_row["filename"]].probabilities[name], abs=1e-6)
    # the CSV the page downloads is predict's CSV, file names aside
    cli_csv = out.read_text().splitlines()
    api_csv = response.json()["csv"].splitlines()
    assert api_csv[0] == cli_csv[0]
    for api_line, cli_line in zip(api_csv[1:], cli_csv[1:]):
        assert api_line.split(",", 1)[1] == cli_line.split(",", 1)[1].replace(str(real_samples) + os.sep, "")
    as_file = client.post("/api/predict?format=csv", files=files)
    assert as_file.status_code == 200 and as_file.headers["content-type"].startswith("text/csv")
    assert "attachment" in as_file.headers["content-disposition"]
    assert as_file.text == response.json()["csv"]


def test_mixed_batch_gives_an_error_row_like_predict(client, real_samples):
    good = (real_samples / "CEX (1).png").read_bytes()
    response = client.post("/api/predict", files=[upload("CEX (1).png", good), upload("notes.png", b"plain text"),
                                                  upload("../../etc/passwd", good)])
    assert response.status_code == 200, response.text
    rows = response.json()["results"]
    assert [r["filename"] for r in rows] == ["CEX (1).png", "notes.png", "passwd"]
    assert rows[0]["status"] == rows[2]["status"] == "ok"
    assert rows[1]["status"].startswith("error: not a PNG, JPEG, TIFF or BMP image")
    assert rows[1]["predicted"] is None and rows[1]["probabilities"] == {}
    assert rows[0]["probabilities"] == rows[2]["probabilities"]  # the name is a label only
    csv_rows = list(csv.DictReader(io.StringIO(response.json()["csv"])))
    assert csv_rows[1]["status"] == rows[1]["status"] and csv_rows[1]["p_cex"] == ""


@pytest.mark.parametrize("fmt, mode", [("PNG", "I;16"), ("TIFF", "L"), ("JPEG", "CMYK"), ("BMP", "P")])
def test_every_accepted_format_and_mode_is_labelled(client, predictor, fmt, mode):
    picture = Image.new(mode, (50, 40), 200)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    row = client.post("/api/predict", files=[upload("x", buffer.getvalue())]).json()["results"][0]
    buffer.seek(0)
    expected = predictor.predict([Image.open(buffer)])[0]
    assert row["status"] == "ok" and row["probabilities"] == pytest.approx(expected.probabilities, abs=1e-9)


# ---- the other endpoints ---------------------------------------------------------------------


def test_model_endpoint_describes_the_model_and_its_file(client, onnx_model):
    info = client.get("/api/model").json()
    assert info["class_names"] == ["cex", "pg"] and info["positive_class"] == "pg"
    assert info["backbone"] == "resnet18" and info["backend"] == "onnx"
    assert info["preprocessing"]["image_size"] == 32
    assert info["temperature"] == pytest.approx(TEMPERATURE)
    assert info["sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert info["limits"] == {"max_request_bytes": 2_000_000, "max_files": 8, "max_pixels": 1_000_000,
                              "max_request_pixels": 1_500_000}
    assert "rejection" in info


def test_health_page_docs_and_openapi(client):
    assert client.get("/api/health").json()["status"] == "ok"
    page = client.get("/")
    assert page.status_code == 200 and 'id="files"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").status_code == 200
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]
    assert_refused(client.get("/api/nothing-here"), 404)


@pytest.mark.parametrize("asset", ["index.html", "app.js", "style.css", "docs.html"])
def test_page_assets_load_nothing_from_other_servers(asset):
    text = (STATIC / asset).read_text()
    assert "://" not in text, f"{asset} refers to another server"


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


# ---- the token, and where the server may listen ---------------------------------------------


def test_token_is_required_on_every_api_call(predictor):
    client = TestClient(create_app(predictor, token="s3cret"))
    for path in ("/api/health", "/api/model"):
        assert_refused(client.get(path), 401, "token")
        assert client.get(path).headers["www-authenticate"] == "Bearer"
        assert_refused(client.get(path, headers={"Authorization": "Bearer wrong"}), 401)
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    # refused before the body is read: an unauthorised upload costs nothing
    assert_refused(client.post("/api/predict", files=[upload("a.png", png_bytes())]), 401)
    ok = client.post("/api/predict", files=[upload("a.png", png_bytes())], headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["results"][0]["status"] == "ok"
    assert client.get("/").status_code == 200  # the page itself holds no data; it asks for the token


def test_binding_beyond_loopback_needs_a_token(onnx_model):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    with pytest.raises(CrystalscopeError, match="--host 0.0.0.0 .* --token"):
        check_bind("0.0.0.0", 8000, None)
    with pytest.raises(CrystalscopeError, match="--token is empty"):
        check_bind("0.0.0.0", 8000, " ")
    check_bind("0.0.0.0", 8000, "s3cret")
    result = CliRunner().invoke(cli_app, ["serve", str(onnx_model), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "error: --host 0.0.0.0" in result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = CliRunner().invoke(cli_app, ["serve", str(onnx_model), "--port", port])
    assert result.exit_code == 2 and f"--port {port}: cannot listen there" in result.output
    result = CliRunner().invoke(cli_app, ["serve", str(onnx_model.with_suffix(".missing"))])
    assert result.exit_code == 2 and "model file not found" in result.output


def test_result_json_carries_every_prediction_field():
    from dataclasses import dataclass, field

    from crystalscope.inference.predictor import Prediction

    @dataclass
    class WithRejection(Prediction):
        score: float = float("nan")
        threshold: float = 0.5
        extra: dict = field(default_factory=dict)

    row = prediction_json(WithRejection(path="x.png", predicted="pg", status="rejected: far from training data"))
    assert row["filename"] == "x.png" and row["status"].startswith("rejected")
    assert row["score"] is None and row["threshold"] == 0.5  # NaN is not JSON


def test_display_name_is_a_label_not_a_path():
    assert display_name("../../etc/passwd", 0) == "passwd"
    assert display_name("C:\\crops\\PG (1).png", 0) == "PG (1).png"
    assert display_name("a\nb.png", 0) == "ab.png"
    assert display_name(None, 4) == "upload-4"


NO_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "timm"):
            raise ImportError(name + " is blocked in this test")
sys.meta_path.insert(0, NoTorch())
from fastapi.testclient import TestClient
from crystalscope.serve.server import build_app
from crystalscope.serve.uploads import ServeLimits
client = TestClient(build_app(sys.argv[1], ServeLimits()))
with open(sys.argv[2], "rb") as f:
    answer = client.post("/api/predict", files=[("files", ("c.png", f.read(), "image/png"))])
print(answer.status_code, answer.json()["results"][0]["status"],
      sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm")))
"""


def test_serving_onnx_needs_no_torch(onnx_model, real_samples):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(onnx_model), str(real_samples / "PG (567).png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "200 ok []", proc.stdout + proc.stderr
