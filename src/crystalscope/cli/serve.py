"""The serve command: web page and HTTP API."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from crystalscope.cli.common import app, user_errors


@app.command("serve")
@user_errors
def serve_cmd(
    model: Path = typer.Argument(..., help="Trained model: an exported .onnx (or a .ckpt when PyTorch is installed)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --token."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes (each loads the model)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CRYSTALSCOPE_TOKEN",
                                        help="Bearer token required on every /api request [env CRYSTALSCOPE_TOKEN]."),
    max_request_mb: float = typer.Option(32.0, "--max-request-mb", help="Largest request body (all files), MiB."),
    max_files: int = typer.Option(64, "--max-files", help="Most images in one request."),
    max_pixels: int = typer.Option(25_000_000, "--max-pixels", help="Most pixels (width x height) in one image."),
    max_request_pixels: int = typer.Option(100_000_000, "--max-request-pixels",
                                           help="Most pixels of all images in one request (bounds its memory)."),
    device: str = typer.Option("auto", "--device", help="For .ckpt models: auto, cpu or cuda (ONNX runs on the CPU)."),
    monitor: Optional[Path] = typer.Option(None, "--monitor", help="A `crystalscope monitor` --out folder: "
                                           "adds /live, the batch as it runs."),
):
    """Serve a web page (drop images, get labels and a CSV) and a REST API (/api/predict, /docs)."""
    from crystalscope.serve.server import serve
    from crystalscope.serve.uploads import ServeLimits

    # the start-up line and per-request notes are log records shown by the CLI's one handler
    # (cli/common.log_to_terminal); uvicorn configures its own access and error logs
    limits = ServeLimits(max_request_bytes=int(max_request_mb * 1024 * 1024), max_files=max_files,
                         max_pixels=max_pixels, max_request_pixels=max_request_pixels)
    serve(model, host=host, port=port, workers=workers, token=token, limits=limits, device=device, monitor_dir=monitor)

