"""The frozen prefix run by ONNX Runtime: same features as PyTorch, same test predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crystalscope.config import load_config
from crystalscope.data.dataset import decode_images, index_folder
from crystalscope.inference.predictor import Predictor
from crystalscope.models.factory import build_model, default_preprocessing, set_trainable_fraction
from crystalscope.training.features import split_for_caching
from crystalscope.training.onnx_prefix import PARITY_ATOL, choose_prefix, onnx_runtime_prefix
from crystalscope.training.run import train
from lines_and_discs import make_split

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> Path:
    return make_split(tmp_path_factory.mktemp("prefix") / "split", counts={"train": (8, 8), "val": (4, 4),
                                                                           "test": (4, 4)}, size=48)


def _prefix_and_images(split: Path, real_samples: Path | None = None):
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 2).eval()
    set_trainable_fraction(model.backbone, 0.33)
    prefix, _ = split_for_caching(model, 64)
    prefix.eval()  # as the feature loop runs it (frozen BatchNorm statistics)
    pre = default_preprocessing("efficientnet_lite0", 64, "stretch")
    paths = list(index_folder(split / "test").paths)[:4]
    if real_samples is not None:
        paths += sorted(real_samples.glob("*.png"))[:4]
    images = torch.from_numpy(decode_images(paths, pre, workers=1, progress=False))
    return prefix, pre.normalize_torch(images)


def test_onnx_runtime_prefix_gives_the_pytorch_features(tiny_split, real_samples):
    torch.set_num_threads(1)
    prefix, batch = _prefix_and_images(tiny_split, real_samples)
    runner, why = onnx_runtime_prefix(prefix, batch, threads=1)
    assert runner is not None, why
    with torch.inference_mode():
        expected = prefix(batch)
    got = runner(batch)
    assert got.shape == expected.shape and got.shape[0] == batch.shape[0]
    assert float((got - expected).abs().max()) <= PARITY_ATOL * max(1.0, float(expected.abs().max()))
    assert "matches PyTorch" in why


def test_a_prefix_that_differs_falls_back_to_pytorch(tiny_split):
    prefix, batch = _prefix_and_images(tiny_split)
    # a tolerance nothing can meet stands for a numerically different runtime
    runner, why = onnx_runtime_prefix(prefix, batch, atol=-1.0, threads=1)
    assert runner is None and "differs from PyTorch" in why
    kept, line = choose_prefix(prefix, batch, "torch", torch.device("cpu"), False)
    assert kept is prefix and "PyTorch" in line


def test_training_with_the_onnx_prefix_predicts_like_the_pytorch_prefix(tiny_split, tmp_path):
    torch.set_num_threads(1)
    results = {}
    for runtime in ("torch", "onnxruntime"):
        cfg = load_config(None, {"data_dir": str(tiny_split), "backbone": "efficientnet_lite0", "weights": "none",
                                 "image_size": 48, "epochs": 1, "batch_size": 8, "trainable_fraction": 0.33,
                                 "cache_frozen": True, "feature_passes": 2, "prefix_runtime": runtime,
                                 "onnx": False, "workers": 1, "cache_dir": "off",
                                 "out": str(tmp_path / runtime)})
        summary = train(cfg, progress=False)
        results[runtime] = json.loads((Path(summary["run_dir"]) / "test_results.json").read_text())
    torch_report, ort_report = results["torch"], results["onnxruntime"]
    assert torch_report["n_images"] == ort_report["n_images"] == 8
    assert torch_report["n_missed"] == ort_report["n_missed"]
    assert np.isclose(torch_report["macro"]["f1"], ort_report["macro"]["f1"])
    # image by image: the two trained models label the test split the same way
    test_paths = list(index_folder(tiny_split / "test").paths)
    labels = {runtime: [p.predicted for p in
                        Predictor.load(tmp_path / runtime / "weights" / "best.ckpt", device="cpu").predict(test_paths)]
              for runtime in results}
    assert labels["torch"] == labels["onnxruntime"] and len(labels["torch"]) == 8
