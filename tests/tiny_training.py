"""The parts a training run builds (config, data, learner, state) at a toy size, for unit tests of
``training/setup.py`` and ``training/epoch.py``: a random-weight resnet18 at 32 px on a split of
a few dozen generated images, decoded without the disk cache."""

from __future__ import annotations

from pathlib import Path

import torch
from lines_and_discs import make_split

from crystalscope.config import TrainConfig, load_config
from crystalscope.training.distributed import World
from crystalscope.training.setup import (
    Learner,
    RunData,
    TrainState,
    build_learner,
    index_data,
    load_data,
)

COUNTS = {"train": (6, 6), "val": (3, 3), "test": (3, 3)}


def tiny_split(root: Path) -> Path:
    """Lines (cex) vs discs (pg), 32 px: 12 train, 6 val, 6 test images."""
    return make_split(root, counts=COUNTS, size=32)


def tiny_config(split: Path, **overrides) -> TrainConfig:
    """resnet18 without pretrained weights, 32 px, batch 4, no decode cache, no rejection fit."""
    values = {"data_dir": str(split), "backbone": "resnet18", "weights": "none", "image_size": 32,
              "batch_size": 4, "epochs": 2, "lr": 0.05, "cache_dir": "off", "workers": 1, "reject_fpr": 0.0,
              "device": "cpu", "prefix_runtime": "torch", **overrides}
    return load_config(None, values).validate_values()


def tiny_parts(split: Path, last: dict | None = None,
               **overrides) -> tuple[TrainConfig, RunData, Learner, TrainState]:
    """Config, decoded data, learner and state, as ``run_training`` builds them before the epochs."""
    cfg = tiny_config(split, **overrides)
    device = torch.device("cpu")
    data = index_data(cfg, last)
    learner, state = build_learner(cfg, data, device, World(), last)
    data = load_data(cfg, data, device, World(), progress=False)
    return cfg, data, learner, state
