"""cli/serve.py: the serve command checks its options and hands them to ``serve`` (no server is started here)."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from cli_checks import error_line, help_text, invoke

import crystalscope.serve.server


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_help_lists_the_key_options():
    text = help_text("serve")
    options = ["--host", "--port", "--workers", "--token", "CRYSTALSCOPE_TOKEN", "--max-request-mb", "--max-files",
               "--max-pixels", "--max-request-pixels", "--device"]
    assert [option for option in options if option not in text] == []


def test_a_missing_model_is_named_before_the_port_opens(tmp_path):
    line = error_line(invoke("serve", tmp_path / "gone.onnx", "--port", str(_free_port())))
    assert line == f"error: {tmp_path / 'gone.onnx'}: model file not found"


def test_a_public_address_without_a_token_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CRYSTALSCOPE_TOKEN", raising=False)
    line = error_line(invoke("serve", tmp_path / "m.onnx", "--host", "0.0.0.0", "--port", str(_free_port())))
    assert line.startswith("error: --host 0.0.0.0 is reachable from other machines: give --token")


def test_the_options_reach_serve_as_limits_and_the_token_may_come_from_the_environment(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(crystalscope.serve.server, "serve", lambda model, **kwargs: seen.update(kwargs, model=model))
    monkeypatch.setenv("CRYSTALSCOPE_TOKEN", "s3cret")
    result = invoke("serve", tmp_path / "m.onnx", "--host", "0.0.0.0", "--port", "8123", "--max-request-mb", "1.5",
                    "--max-files", "3", "--max-pixels", "1000", "--max-request-pixels", "2000", "--device", "cpu")
    assert result.exit_code == 0, result.output
    limits = seen["limits"]
    assert (seen["model"], seen["host"], seen["port"], seen["token"], seen["device"]) == (
        tmp_path / "m.onnx", "0.0.0.0", 8123, "s3cret", "cpu")
    assert (limits.max_request_bytes, limits.max_files, limits.max_pixels, limits.max_request_pixels) == (
        1_572_864, 3, 1000, 2000)


def test_zero_workers_is_a_usage_error(tmp_path):
    result = invoke("serve", tmp_path / "m.onnx", "--workers", "0")
    assert result.exit_code == 2 and "--workers" in result.output and "Traceback" not in result.output
