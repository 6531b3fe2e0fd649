"""Predictor.predict decodes the next batch while the model runs: same rows, order and errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crystalscope.data.transforms import Preprocessing
from crystalscope.inference.predictor import Predictor
from crystalscope.models.factory import HeadSpec, build_model
from crystalscope.models.checkpoint import make_checkpoint


def _predictor() -> Predictor:
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(40.0)  # spread the untrained logits so a mix-up would show
    ckpt = make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", preprocessing=Preprocessing(image_size=32))
    return Predictor.from_checkpoint(ckpt, device="cpu")


def test_pipelined_batches_give_the_rows_of_one_big_batch(tmp_path: Path):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    items: list = []
    for i in range(7):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 30, 3), dtype=np.uint8)).save(path)
        items.append(path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    items.insert(3, tmp_path / "broken.png")
    items.append(Image.fromarray(rng.integers(0, 255, (25, 25, 3), dtype=np.uint8)))  # in-memory image
    predictor = _predictor()
    done: list[int] = []
    small = predictor.predict(items, batch_size=2, on_batch=done.append)
    whole = predictor.predict(items, batch_size=64)
    assert done == [2, 2, 2, 2, 1]
    assert [p.path for p in small] == [p.path for p in whole] == [str(i) for i in items[:-1]] + ["<image 8>"]
    assert small[3].status.startswith("error") and sum(not p.ok for p in small) == 1
    for a, b in zip(small, whole):
        assert a.predicted == b.predicted and a.status == b.status
        if a.ok:
            assert np.allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-6)
