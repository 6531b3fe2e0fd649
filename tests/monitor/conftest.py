"""Fixtures shared by the monitor tests: one tiny trained model and one generated run per session.

One tiny model is trained per test session through the library (frozen offline ImageNet
efficientnet_lite0 with cached features, 64 px, head only) on crops cut from generated
frames by their ground-truth boxes, with the monitor's own crop convention; every test uses
its ONNX export.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor_runs import SMALL, crops_from_truth


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """A tiny CEX/PG model (ONNX) trained through the library on frame-cut crops."""
    pytest.importorskip("onnxruntime")
    from crystalscope.config import load_config
    from crystalscope.monitor.frames import ProcessSpec, generate_process
    from crystalscope.training.run import train

    root = tmp_path_factory.mktemp("tiny-model")
    generate_process(root / "run", ProcessSpec(frames=120, pg_onset_s=0.0, pg_max=0.5, pg_rise_s=1e-6,
                                               seed=100, **SMALL))
    crops_from_truth(root / "run", root / "split")
    config = load_config(None, {
        "data_dir": str(root / "split"), "out": str(root / "model"), "backbone": "efficientnet_lite0",
        "weights": "imagenet", "trainable_fraction": 0.0, "cache_features": True, "image_size": 64,
        "resize": "pad", "epochs": 15, "lr": 0.01, "batch_size": 32, "seed": 0, "device": "cpu",
        "cache_dir": str(root / "cache"), "patience": 15,
        # no rejection fit: these tests are about detection and the alarm rule; how rejected
        # particles are counted is tested with a stand-in predictor in test_run.py
        "reject_fpr": 0.0,
    })
    train(config, progress=False)
    return root / "model" / "model.onnx"


@pytest.fixture(scope="session")
def onset_run(tmp_path_factory) -> Path:
    """30 frames, 10 s apart, PG from 150 s rising quickly to half the particles."""
    from crystalscope.monitor.frames import ProcessSpec, generate_process

    out = tmp_path_factory.mktemp("onset") / "run"
    generate_process(out, ProcessSpec(frames=30, pg_onset_s=150.0, pg_max=0.6, pg_rise_s=20.0, seed=7, **SMALL))
    return out
