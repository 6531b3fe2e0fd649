"""Fixtures shared by the serve tests: the tiny exported model, its predictor and a test client."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def onnx_model(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from tiny_onnx import tiny_onnx_model

    return tiny_onnx_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="session")
def predictor(onnx_model):
    from crystalscope import Predictor

    return Predictor.load(onnx_model)


@pytest.fixture
def client(predictor):
    """The app with small limits (2 MB, 8 files, 1 MP per image, 1.5 MP per request)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from crystalscope.serve.app import create_app
    from crystalscope.serve.uploads import ServeLimits

    return TestClient(create_app(predictor, ServeLimits(max_request_bytes=2_000_000, max_files=8,
                                                        max_pixels=1_000_000, max_request_pixels=1_500_000)))
