"""The FastAPI application: the page at ``/``, the API under ``/api``.

Every answer of the API is JSON; every refused request is a 4xx with ``{"error": message}``.
Predictions go through :meth:`Predictor.predict` and the CSV through
:func:`~crystalscope.inference.predictor.predictions_csv`, so the page, the API and
``crystalscope predict`` give the same numbers and the same CSV.

Guards run as plain ASGI middleware *before* the body is read, so an unauthorised or
oversized upload costs the server nothing: the bearer token (every ``/api`` path, when the
app has one) and the request size (declared ``Content-Length`` and the bytes actually sent).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import math
import time
from pathlib import Path
from typing import List

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from crystalscope.version import __version__
from crystalscope.inference.predictor import Prediction, Predictor, predictions_csv
from crystalscope.serve.uploads import ALLOWED_FORMATS, ServeLimits, UploadError, decode_upload, display_name

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).with_name("static")


def create_app(predictor: Predictor, limits: ServeLimits | None = None, token: str | None = None,
               monitor_dir: Path | None = None) -> FastAPI:
    """Build the web application around a loaded model.

    Args:
        predictor: the model, loaded once and shared by all requests.
        limits: request size, files per request, pixels per image.
        token: when set, every ``/api`` request needs ``Authorization: Bearer <token>``.
        monitor_dir: a ``crystalscope monitor`` output folder shown live at ``/live``.

    Example:
        >>> from fastapi.testclient import TestClient  # doctest: +SKIP
        >>> client = TestClient(create_app(Predictor.load("model.onnx")))  # doctest: +SKIP
        >>> client.get("/api/health").json()["status"]  # doctest: +SKIP
        'ok'
    """
    limits = limits or ServeLimits()
    # one prediction before the first request: starts the decoding threads once (not raced by
    # concurrent first requests) and takes ONNX Runtime's first-run cost out of user latency
    side = predictor.preprocessing.image_size
    predictor.predict([Image.new("RGB", (side, side))])
    # our own /docs page: FastAPI's default one loads Swagger UI from a CDN
    app = FastAPI(title="crystalscope", version=__version__, docs_url=None, redoc_url=None,
                  description="Label crystal images with a crystalscope model.")
    app.state.model_info = model_info(predictor, limits)
    app.state.started = time.monotonic()
    app.add_middleware(ApiGuard, token=token, max_request_bytes=limits.max_request_bytes)
    _add_error_handlers(app)
    _add_api_routes(app, predictor, limits)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if monitor_dir is not None:
        from crystalscope.serve.live import add_live_routes

        add_live_routes(app, Path(monitor_dir))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html")

    return app


def _add_api_routes(app: FastAPI, predictor: Predictor, limits: ServeLimits) -> None:
    @app.get("/api/health", summary="Liveness: the model is loaded and answering")
    def health() -> dict:
        return {"status": "ok", "backend": predictor.backend_name,
                "uptime_s": round(time.monotonic() - app.state.started, 1)}

    @app.get("/api/model", summary="What the model is: classes, backbone, preprocessing, calibration, hash")
    def model() -> dict:
        return app.state.model_info

    @app.post("/api/predict", summary="Label uploaded images (multipart field `files`, repeated)")
    async def predict(files: List[UploadFile] = File(..., description=f"Images ({', '.join(ALLOWED_FORMATS)})."),
                      answer_format: str = Query("json", alias="format", pattern="^(json|csv)$",
                                                 description="`json` (results and CSV text) or `csv` (the CSV file).")):
        predictions = await predict_uploads(predictor, files, limits)
        csv_text = predictions_csv(predictions, predictor.class_names)
        if answer_format == "csv":
            return Response(csv_text, media_type="text/csv",
                            headers={"Content-Disposition": 'attachment; filename="predictions.csv"'})
        return {"results": [prediction_json(p) for p in predictions], "csv": csv_text}


async def predict_uploads(predictor: Predictor, files: List[UploadFile], limits: ServeLimits) -> list[Prediction]:
    """Decode the uploads, label the readable ones, keep one row per file in order.

    A bad file among good ones gets an ``error: ...`` row, as in ``predict``'s CSV; a
    request where no file is usable is refused with the first file's 4xx.
    """
    if not files:
        raise HTTPException(400, "no files in the form: send images in the multipart field 'files'")
    if len(files) > limits.max_files:
        raise HTTPException(413, f"{len(files)} files in one request: the limit is {limits.max_files}; "
                                 "send them in several requests")
    rows: list[Prediction] = []
    images, image_rows = [], []
    errors: list[UploadError] = []
    pixels = 0
    for index, upload in enumerate(files):
        name = display_name(upload.filename, index)
        data = await upload.read()
        try:
            images.append(await run_in_threadpool(decode_upload, data, name, limits))
            image_rows.append(len(rows))
            rows.append(Prediction(path=name))
            pixels += images[-1].width * images[-1].height
            if pixels > limits.max_request_pixels:  # checked per file: at most one image beyond the limit is held
                raise HTTPException(413, f"the images of this request hold over {limits.max_request_pixels:,} "
                                         "pixels together; send fewer images per request")
        except UploadError as exc:
            errors.append(exc)
            rows.append(Prediction(path=name, status=f"error: {str(exc)[len(name) + 2:]}"))
    if not images:
        first = errors[0]
        same = all(e.status_code == first.status_code for e in errors)
        message = "; ".join(str(e) for e in errors[:5]) + (" ..." if len(errors) > 5 else "")
        raise HTTPException(first.status_code if same else 422, message)
    for position, prediction in zip(image_rows, await run_in_threadpool(predictor.predict, images)):
        rows[position] = dataclasses.replace(prediction, path=rows[position].path)
    logger.info("predicted %d files (%d unreadable)", len(rows), len(errors))
    return rows


def prediction_json(prediction: Prediction) -> dict:
    """One result as JSON: every field of :class:`Prediction`, ``path`` renamed ``filename``.

    Built from the dataclass fields, so fields added to ``Prediction`` (a rejection score,
    its threshold) appear without a change here. Non-finite floats become ``null``.

    Example:
        >>> prediction_json(Prediction(path="a.png", status="error: empty file"))["filename"]
        'a.png'
    """
    fields = dataclasses.asdict(prediction)
    return {"filename": fields.pop("path"), **_json_safe(fields)}


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def model_info(predictor: Predictor, limits: ServeLimits) -> dict:
    """What ``GET /api/model`` answers: the model's description, file hash and the limits."""
    source = Path(predictor.source)
    return {
        "crystalscope_version": __version__,
        "model_file": source.name,
        "sha256": _sha256(source) if source.is_file() else None,
        "backend": predictor.backend_name,
        "class_names": list(predictor.class_names),
        "positive_class": predictor.positive_class,
        "backbone": predictor.backbone,
        "preprocessing": predictor.preprocessing.to_dict(),
        "temperature": predictor.temperature,
        "rejection": rejection_info(predictor),
        "limits": dataclasses.asdict(limits),
    }


def rejection_info(predictor: Predictor) -> dict | None:
    """The model's fitted rejection of foreign images (method and threshold), or ``None``.

    ``None`` for a model trained without it (or exported before it existed); the same summary
    ``predict_paths`` returns.
    """
    rejection = predictor.rejection
    if rejection is None:
        return None
    return {"method": rejection.method, "threshold": _json_safe(float(rejection.threshold))}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- errors: every refusal is {"error": message} with a 4xx --------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any("files" in map(str, p.get("loc", ())) for p in problems):
            message = "no files in the form: send images as multipart/form-data in the field 'files'"
            return JSONResponse({"error": message}, status_code=400)
        where = ", ".join(".".join(map(str, p.get("loc", ()))) + ": " + str(p.get("msg", "")) for p in problems)
        return JSONResponse({"error": f"bad request ({where})"}, status_code=422)


def _json_refusal(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class ApiGuard:
    """ASGI middleware for ``/api``: the bearer token, then the request size, before the body.

    The size is checked twice: the declared ``Content-Length`` (refused at once) and the
    bytes actually received (a chunked upload without a length is cut off at the limit).
    """

    def __init__(self, app, token: str | None, max_request_bytes: int):
        self.app, self.token, self.max_bytes = app, token, max_request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.token is not None and not self._authorised(headers.get(b"authorization", b"")):
            refusal = _json_refusal(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                                    {"WWW-Authenticate": "Bearer"})
            return await refusal(scope, receive, send)
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _json_refusal(413, self._too_large(int(declared)))(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # raised inside the form parser; FastAPI passes HTTPExceptions through as they are
                raise HTTPException(413, self._too_large(received))
            return message

        await self.app(scope, counted_receive, send)

    def _authorised(self, header: bytes) -> bool:
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest(header, expected)

    def _too_large(self, size: int) -> str:
        return (f"request of {size:,} bytes is over the limit of {self.max_bytes:,} bytes; "
                "send fewer or smaller images per request")
