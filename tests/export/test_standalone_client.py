"""A client that has only the .onnx file: onnxruntime, numpy, Pillow and the metadata.

No crystalscope import in this module: it reads ``preprocessing_spec`` and ``rejection_spec``
from the file, prepares the input as the spec says, runs the graph and must get the
probabilities and accept/reject decisions that ``crystalscope predict`` writes, on the real
crops and every ``synth-ood`` set. crystalscope itself runs only in subprocesses (the model
is made by ``tests/fitted_model.py``, the reference by the CLI).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TESTS = Path(__file__).resolve().parents[1]
RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def crystalscope(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "crystalscope", *args], check=True, capture_output=True,
                   timeout=600, env=os.environ.copy())


@pytest.fixture
def model_and_images(tmp_path_factory, real_samples) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("standalone")
    model = root / "model.onnx"
    subprocess.run([sys.executable, str(TESTS / "fitted_model.py"), str(model)], check=True, timeout=600)
    crystalscope("synth-ood", str(root / "ood"), "--per-set", "4", "--seed", "11")
    images = sorted(real_samples.glob("*.png")) + sorted((root / "ood").rglob("*.png"))
    return model, images


def read_metadata(session) -> dict:
    return json.loads(session.get_modelmeta().custom_metadata_map["crystalscope"])


def to_rgb(image: Image.Image) -> Image.Image:
    """``decode`` of preprocessing_spec for the modes these files come in (8-bit, grey, alpha)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def prepare(path: Path, spec: dict, size: int) -> np.ndarray:
    """One image as the model input ``(3, size, size)`` float32, from ``preprocessing_spec`` alone."""
    resize = spec["resize"]
    with Image.open(path) as image:
        rgb = to_rgb(image)
    filter_ = RESAMPLING[resize["filter"]]
    if resize["policy"] == "pad":
        w, h = rgb.size
        scale = size / max(w, h)
        new_w, new_h = (max(1, round(side * scale)) for side in (w, h))  # round half to even, float64
        canvas = Image.new("RGB", (size, size), (int(resize["pad_value"].split()[0]),) * 3)
        canvas.paste(rgb.resize((new_w, new_h), filter_, reducing_gap=None),
                     ((size - new_w) // 2, (size - new_h) // 2))
        rgb = canvas
    else:
        rgb = rgb.resize((size, size), filter_, reducing_gap=None)
    norm = spec["normalize"]
    x = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)
    return x.transpose(2, 0, 1)


def test_the_file_alone_gives_the_probabilities_and_decisions_of_predict(model_and_images, tmp_path):
    model, images = model_and_images
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = read_metadata(session)
    spec, rejection = meta["preprocessing_spec"], meta["rejection_spec"]
    assert rejection["comparison"] == "reject if score > threshold" and len(rejection["image_statistics"]) == 14
    size = meta["input_shape"][-1]
    batch = np.stack([prepare(p, spec, size) for p in images])
    probabilities, scores, accepted = session.run([meta["probabilities_name"], "ood_score", "accepted"],
                                                  {meta["input_name"]: batch})
    assert np.array_equal(accepted, scores <= rejection["threshold"])

    out = tmp_path / "predictions.csv"
    crystalscope("predict", str(model), *map(str, images), "--out", str(out))
    with open(out, newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    expected = np.array([[float(rows[str(p)][f"p_{c}"]) for c in meta["class_names"]] for p in images])
    expected_accepted = np.array([rows[str(p)]["status"] == "ok" for p in images])
    assert np.abs(probabilities - expected).max() < 1e-5  # the CSV has 6 decimals
    assert np.array_equal(accepted, expected_accepted)
    assert accepted.any() and not accepted.all()  # both decisions occur: the comparison bites
    cat = [i for i, p in enumerate(images) if "cat" in p.name]
    assert cat and not accepted[cat].any()
