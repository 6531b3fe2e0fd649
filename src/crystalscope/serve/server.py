"""Running the app: check the bind address, load the model once, hand it to uvicorn."""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import json
import logging
import os
import socket
from pathlib import Path

from crystalscope.errors import CrystalscopeError, require
from crystalscope.serve.uploads import ServeLimits

logger = logging.getLogger(__name__)
#: With --workers > 1 uvicorn starts each worker from an import string; the settings travel here.
SETTINGS_ENV = "CRYSTALSCOPE_SERVE_SETTINGS"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1).

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("0.0.0.0")
        (True, False)
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind(host: str, port: int, token: str | None, workers: int = 1) -> None:
    """Refuse settings that would expose the model or cannot run.

    Raises:
        CrystalscopeError: a non-loopback ``--host`` without ``--token``, an empty token, a
            port outside 0..65535, or fewer than one worker.
    """
    if token is not None and not token.strip():
        raise CrystalscopeError("--token is empty: give a long random string (e.g. `openssl rand -hex 16`)")
    if not is_loopback(host) and token is None:
        raise CrystalscopeError(f"--host {host} is reachable from other machines: give --token T (clients send "
                                "'Authorization: Bearer T'), or bind to 127.0.0.1")
    if not 0 <= port <= 65535:
        raise CrystalscopeError(f"--port {port} must be between 0 and 65535")
    if workers < 1:
        raise CrystalscopeError(f"--workers {workers} must be 1 or more")


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another program holds, with a one-line error instead of uvicorn's exit.

    Raises:
        CrystalscopeError: ``host:port`` cannot be bound (in use, or an address not on this machine).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise CrystalscopeError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                                    "choose another --port") from None


def build_app(model: str | os.PathLike, limits: ServeLimits, token: str | None = None, device: str = "auto",
              monitor_dir: str | None = None):
    """Load ``model`` (a .onnx, or a .ckpt when torch is installed) and build the app.

    Example:
        >>> app = build_app("runs/exp1/model.onnx", ServeLimits())  # doctest: +SKIP
    """
    from crystalscope.inference.predictor import Predictor
    from crystalscope.serve.app import create_app

    return create_app(Predictor.load(model, device=device), limits, token, monitor_dir)


def app_from_environment():
    """uvicorn factory for ``--workers > 1``: each worker loads the model from the settings."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    return build_app(settings["model"], ServeLimits(**settings["limits"]), settings["token"], settings["device"],
                     settings.get("monitor_dir"))


def serve(model: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          token: str | None = None, limits: ServeLimits | None = None, device: str = "auto",
          monitor_dir: str | os.PathLike | None = None) -> None:
    """Serve the page and the API until interrupted.

    The model is loaded before the port opens, so a wrong model file is a one-line error,
    not a server that answers 500.

    Example:
        >>> serve("runs/exp1/model.onnx", port=8000)  # doctest: +SKIP
    """
    uvicorn = require("uvicorn", "serve")
    require("fastapi", "serve")
    if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
        require("python_multipart", "serve")  # FastAPI needs it to read uploads; raises the one-line error
    limits = limits or ServeLimits()
    check_bind(host, port, token, workers)
    check_port_free(host, port)
    if monitor_dir is not None:
        from crystalscope.serve.live import check_monitor_dir

        monitor_dir = str(check_monitor_dir(monitor_dir).resolve())
    app = build_app(model, limits, token, device, monitor_dir)  # a bad model file fails here, before the port opens
    logger.info("serving %s: open http://%s:%d/ (API docs at /docs); Ctrl+C stops", model, host, port)
    if workers == 1:
        uvicorn.run(app, host=host, port=port, log_level="info")
        return
    del app  # each worker process loads its own copy
    os.environ[SETTINGS_ENV] = json.dumps({"model": str(Path(model).resolve()), "token": token, "device": device,
                                           "monitor_dir": monitor_dir,
                                           "limits": dataclasses.asdict(limits)})
    uvicorn.run("crystalscope.serve.server:app_from_environment", factory=True, host=host, port=port,
                workers=workers, log_level="info")
