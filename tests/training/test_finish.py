"""The deliverables after the last epoch come from the one inference path (training/finish.py)."""

from __future__ import annotations

import json

import pytest
from lines_and_discs import make_split

from crystalscope.config import load_config
from crystalscope.inference.predictor import Predictor
from crystalscope.training.run import train


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return make_split(tmp_path_factory.mktemp("data") / "split",
                      counts={"train": (8, 8), "val": (4, 4), "test": (3, 3)}, size=32)


def test_temperature_and_test_report_use_the_predictor_in_fp32(split, tmp_path, monkeypatch):
    calls = []
    real = Predictor.logits

    def spy(self, batch):
        calls.append((str(batch.dtype).rpartition(".")[2], tuple(batch.shape)))  # numpy or torch
        return real(self, batch)

    monkeypatch.setattr(Predictor, "logits", spy)
    cfg = load_config(None, {"data_dir": str(split), "backbone": "resnet18", "weights": "none", "image_size": 32,
                             "epochs": 1, "batch_size": 4, "onnx": False, "reject_fpr": 0, "cache_dir": "off",
                             "precision": "bf16", "out": str(tmp_path / "run")})
    summary = train(cfg, progress=False)
    # val (8 images) then test (6 images), normalised float32 batches of --batch-size
    assert [shape[0] for _, shape in calls] == [4, 4, 4, 2] and {d for d, _ in calls} == {"float32"}
    # the report's numbers are what the saved model gives through the same Predictor
    report = json.loads((tmp_path / "run" / "test_results.json").read_text())
    predictor = Predictor.load(tmp_path / "run" / "weights" / "best.ckpt", device="cpu")
    files = sorted((split / "test").rglob("*.png"))
    missed = sum(p.predicted != p.path.split("/")[-2].lower() for p in predictor.predict([str(f) for f in files]))
    assert summary["test"]["n_images"] == report["n_images"] == 6
    assert report["n_missed"] == missed
    assert report["temperature"] == pytest.approx(predictor.temperature)
