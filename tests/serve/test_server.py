"""Running the server (serve/server.py): where it may listen, one-line start-up errors, ONNX without torch."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from crystalscope.cli import app as cli_app  # noqa: E402
from crystalscope.errors import CrystalscopeError  # noqa: E402
from crystalscope.serve.server import check_bind, is_loopback  # noqa: E402


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


@pytest.mark.parametrize("key,value", [("temperature", float("nan")), ("format", "crystalscope-onnx/99"),
                                       ("class_names", ["cex", "cex"])])
def test_the_app_is_not_built_on_a_model_with_a_bad_description(onnx_model, tmp_path, key, value):
    """A bad model is refused when the server starts (one line), not answered with 500 per request."""
    import json

    onnx = pytest.importorskip("onnx")
    from crystalscope.serve.server import build_app
    from crystalscope.serve.uploads import ServeLimits

    proto = onnx.load(str(onnx_model))
    entry = next(p for p in proto.metadata_props if p.key == "crystalscope")
    meta = json.loads(entry.value)
    meta[key] = value
    entry.value = json.dumps(meta)
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(CrystalscopeError, match=key) as err:
        build_app(bad, ServeLimits())
    assert "\n" not in str(err.value)
