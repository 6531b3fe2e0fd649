"""The serve app (serve/app.py): every endpoint through FastAPI's TestClient, the same numbers as
`crystalscope predict`, the token."""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")
from fastapi.testclient import TestClient  # noqa: E402

from crystalscope import Predictor  # noqa: E402
from crystalscope.cli import app as cli_app  # noqa: E402
from crystalscope.serve.app import create_app, prediction_json, rejection_info  # noqa: E402
from close_rows import assert_rows_close  # noqa: E402
from serve_requests import assert_refused, png_bytes, upload  # noqa: E402
from tiny_onnx import TEMPERATURE  # noqa: E402

STATIC = Path(__file__).resolve().parents[2] / "src" / "crystalscope" / "serve" / "static"


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
            # other batchings (and the CSV's 6 decimals): equal within 1e-5, not bit for bit
            assert abs(api_row["probabilities"][name] - float(cli_row[f"p_{name}"])) <= 1e-5
            assert api_row["probabilities"][name] == pytest.approx(
                expected[api_row["filename"]].probabilities[name], abs=1e-5)
    # the CSV the page downloads is predict's CSV, file names aside
    cli_rows = list(csv.DictReader(io.StringIO(out.read_text().replace(str(real_samples) + os.sep, ""))))
    api_rows = list(csv.DictReader(io.StringIO(response.json()["csv"])))
    assert_rows_close(api_rows, cli_rows, atol=1e-5)
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
    # the name is a label only (two places in one batch: equal within float rounding)
    assert rows[0]["probabilities"] == pytest.approx(rows[2]["probabilities"], abs=1e-5)
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
    assert info["rejection"] is None  # the tiny model has no fitted rejection of foreign images


def test_model_endpoint_states_a_fitted_rejection():
    from types import SimpleNamespace

    def with_rejection(threshold):
        return SimpleNamespace(rejection=SimpleNamespace(method="mahalanobis", threshold=threshold))

    assert rejection_info(with_rejection(12.5)) == {"method": "mahalanobis", "threshold": 12.5}
    assert rejection_info(with_rejection(float("inf")))["threshold"] is None  # not JSON: null
    assert rejection_info(SimpleNamespace(rejection=None)) is None


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


# ---- the token --------------------------------------------------------------------------------


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
