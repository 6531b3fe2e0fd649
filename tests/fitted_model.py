"""Write a tiny ONNX model with a fitted rejection: ``python tests/fitted_model.py OUT.onnx``.

Run in a subprocess by tests that must not import crystalscope themselves (the standalone
client test). Untrained resnet18 at 48 px; rejection fitted on generated crystal crops at a
10 % target rate, so accepted and rejected images both occur.
"""

from __future__ import annotations

import sys
from pathlib import Path


def write_fitted_model(out: Path, image_size: int = 48) -> Path:
    import numpy as np
    import torch
    from PIL import Image

    from crystalscope.data.synth import DIFFICULTIES, render_cex, render_pg
    from crystalscope.data.transforms import Preprocessing
    from crystalscope.evaluation.ood import fit_detector, image_statistics
    from crystalscope.export.onnx import export_checkpoint
    from crystalscope.inference.predictor import Predictor
    from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint
    from crystalscope.models.factory import HeadSpec, build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    pre = Preprocessing(image_size=image_size, resize="pad")
    ckpt = make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", preprocessing=pre, temperature=1.3)
    rng = np.random.default_rng(0)
    renders = [render_cex, render_pg] * 24
    resized = np.stack([pre.resize_uint8(Image.fromarray(r(rng, DIFFICULTIES["realistic"]))) for r in renders])
    logits, features = Predictor.from_checkpoint(ckpt).logits_and_features(pre.normalize(resized))
    stats = image_statistics(resized)
    labels = np.arange(48) % 2
    ckpt["ood"] = fit_detector(features[:32], labels[:32], features[32:], logits[32:], 2, 0.1,
                               train_image_stats=stats[:32], val_image_stats=stats[32:]).to_dict()
    ckpt_path = save_checkpoint(ckpt, out.with_suffix(".ckpt"))
    return Path(export_checkpoint(ckpt_path, out)["path"])


if __name__ == "__main__":
    write_fitted_model(Path(sys.argv[1]))
