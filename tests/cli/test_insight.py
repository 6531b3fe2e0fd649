"""cli/insight.py: embed, drift and explain at the command line (bad input, help, explain's
all-unreadable exit)."""

from __future__ import annotations

import pytest
from cli_checks import error_line, help_text, invoke, tiny_checkpoint


@pytest.mark.parametrize("command, options", [
    ("embed", ["--out", "--clusters", "--projection", "--groups", "--per-cluster", "--batch-size", "--force"]),
    ("drift", ["--model", "--out", "--groups", "--rate", "--neighbours", "--permutations", "--image-size"]),
    ("explain", ["--out", "--class", "--layer", "--batch-size", "--recursive", "--force"]),
])
def test_help_lists_the_key_options(command, options):
    text = help_text(command)
    assert [option for option in options if option not in text] == []


def test_embed_with_a_missing_model_names_it(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")  # listed by name; the model is looked at first
    line = error_line(invoke("embed", tmp_path / "gone.onnx", tmp_path / "images", "--out", tmp_path / "e"))
    assert line == f"error: {tmp_path / 'gone.onnx'}: model file not found"
    assert not (tmp_path / "e").exists()


def test_drift_with_a_missing_reference_names_it(tmp_path):
    (tmp_path / "new").mkdir()
    line = error_line(invoke("drift", tmp_path / "gone", tmp_path / "new", "--out", tmp_path / "d"))
    assert line.startswith(f"error: REFERENCE {tmp_path / 'gone'}: folder not found")


def test_drift_with_an_empty_reference_says_what_images_it_looks_for(tmp_path):
    for name in ("ref", "new"):
        (tmp_path / name).mkdir()
    (tmp_path / "new" / "a.png").write_bytes(b"x")
    line = error_line(invoke("drift", tmp_path / "ref", tmp_path / "new", "--out", tmp_path / "d"))
    assert f"no image files found in {tmp_path / 'ref'}" in line and ".png" in line


def test_explain_refuses_an_onnx_model_and_says_which_file_to_use(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    line = error_line(invoke("explain", tmp_path / "model.onnx", tmp_path, "--out", tmp_path / "x"))
    assert "model.onnx: explain needs the PyTorch checkpoint (.ckpt)" in line and "best.ckpt" in line


def test_explain_refuses_a_folder_where_no_file_is_an_image(tmp_path):
    model = tiny_checkpoint(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"nope")
    result = invoke("explain", model, images, "--out", tmp_path / "x", "--device", "cpu")
    line = error_line(result, code=2)
    assert line.startswith("error: none of the 1 files could be read as an image (first: ")
    assert "a.png" in line and not (tmp_path / "x").exists()  # nothing explained, no folder claims it
