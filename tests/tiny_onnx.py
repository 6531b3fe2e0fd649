"""A tiny exported model for the serve tests: untrained resnet18 at 32 px, logits spread out."""

from __future__ import annotations

from pathlib import Path

import torch

from crystalscope.data.transforms import Preprocessing
from crystalscope.export.onnx import export_checkpoint
from crystalscope.models.factory import HeadSpec, build_model
from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint

TEMPERATURE = 1.3


def tiny_onnx_model(folder: Path) -> Path:
    """Write ``folder/tiny.ckpt`` and its verified export ``folder/tiny.onnx``; return the .onnx."""
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(40.0)  # untrained logits are ~0: make comparisons bite
    ckpt = make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", temperature=TEMPERATURE,
                           preprocessing=Preprocessing(image_size=32))
    path = save_checkpoint(ckpt, Path(folder) / "tiny.ckpt")
    return Path(export_checkpoint(path, Path(folder) / "tiny.onnx")["path"])


def untrained_model_files(folder: Path, image_size: int = 48) -> dict[str, Path]:
    """Untrained resnet18 (seed 0, temperature 1) as ``{"ckpt": .ckpt, "onnx": .onnx with features}``."""
    torch.manual_seed(0)
    model = build_model("resnet18", 2).eval()
    ckpt = make_checkpoint(model, backbone="resnet18", head=HeadSpec(), class_names=["cex", "pg"],
                           positive_class="pg", temperature=1.0, preprocessing=Preprocessing(image_size=image_size))
    path = save_checkpoint(ckpt, Path(folder) / "tiny.ckpt")
    return {"ckpt": path, "onnx": Path(export_checkpoint(path, Path(folder) / "tiny.onnx")["path"])}
