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


def test_report_and_rejection_use_one_predictor_pass_in_fp32(split, tmp_path, monkeypatch):
    calls = []
    real = Predictor.logits_and_features

    def spy(self, batch):
        calls.append((str(batch.dtype).rpartition(".")[2], tuple(batch.shape)))  # numpy or torch
        return real(self, batch)

    monkeypatch.setattr(Predictor, "logits_and_features", spy)
    cfg = load_config(None, {"data_dir": str(split), "backbone": "resnet18", "weights": "none", "image_size": 32,
                             "epochs": 1, "batch_size": 4, "onnx": False, "reject_fpr": 0.05, "cache_dir": "off",
                             "precision": "bf16", "out": str(tmp_path / "run")})
    summary = train(cfg, progress=False)
    # each image once, in normalised float32 batches of --batch-size: val (8) and test (6) for the
    # temperature and the report, whose features the rejection fit reuses, then train (16) for it
    assert [shape[0] for _, shape in calls] == [4, 4, 4, 2, 4, 4, 4, 4] and {d for d, _ in calls} == {"float32"}
    # the report's numbers are what the saved model gives through the same Predictor
    report = json.loads((tmp_path / "run" / "test_results.json").read_text())
    predictor = Predictor.load(tmp_path / "run" / "weights" / "best.ckpt", device="cpu")
    files = sorted((split / "test").rglob("*.png"))
    predictions = predictor.predict([str(f) for f in files])
    missed = sum(p.predicted != p.path.split("/")[-2].lower() for p in predictions)
    assert summary["test"]["n_images"] == report["n_images"] == 6
    assert report["n_missed"] == missed
    assert report["temperature"] == pytest.approx(predictor.temperature)
    # the rejection fitted on the report's own features rejects what Predictor rejects
    assert report["rejection"]["n_rejected"] == sum(p.rejected for p in predictions)
