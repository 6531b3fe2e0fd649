"""Self-describing checkpoints.

A checkpoint is a plain dict of strings, numbers, lists and tensors (loadable with
``torch.load(..., weights_only=True)``) that holds everything ``predict``, ``evaluate`` and
``export`` need: backbone name, head spec, class names, positive class, preprocessing and the
calibration temperature, next to the weights. Training state (optimizer, epoch, stopping
state) is stored under ``"training"`` so ``--resume`` can continue.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError
from crystalscope.formats import CHECKPOINT_FORMAT
from crystalscope.io import write_bytes
from crystalscope.models.description import validate_description
from crystalscope.models.factory import CrystalClassifier, HeadSpec, build_model

FORMAT = CHECKPOINT_FORMAT


def make_checkpoint(model: CrystalClassifier, *, backbone: str, head: HeadSpec, class_names: list[str],
                    positive_class: str | None, preprocessing: Preprocessing, temperature: float = 1.0,
                    training: dict | None = None) -> dict:
    """Assemble the checkpoint dict (weights moved to the CPU)."""
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "backbone": backbone,
        "head": head.to_dict(),
        "class_names": list(class_names),
        "positive_class": positive_class,
        "preprocessing": preprocessing.to_dict(),
        "temperature": float(temperature),
        "model_state": state,
        "training": training or {},
    }


def save_checkpoint(ckpt: dict, path: str | os.PathLike, *more_paths: str | os.PathLike) -> Path:
    """Write atomically: an interrupted save never leaves a broken file under ``path``.

    Serialised in memory first and written by Python: ``torch.save`` to a path reports a full
    disk as ``RuntimeError: basic_ios::clear: iostream error``; a Python write raises
    ``OSError(ENOSPC)`` naming the file, which the CLI turns into "no space left on device".
    ``more_paths`` get the same bytes, in order after ``path``: serialised once (a resnet101
    checkpoint with its optimiser state takes about half a second).

    Example:
        >>> save_checkpoint(ckpt, "weights/best.ckpt", "weights/last.ckpt")  # doctest: +SKIP
        PosixPath('weights/best.ckpt')
    """
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    for target in (path, *more_paths):
        write_bytes(target, buffer.getbuffer())
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and validate a checkpoint (no arbitrary unpickling).

    Raises:
        CrystalscopeError: missing file, not a checkpoint, written by another tool, or a bad
            value in its description (:func:`~crystalscope.models.description.validate_description`).
    """
    path = Path(path)
    if not path.is_file():
        raise CrystalscopeError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CrystalscopeError(f"{path}: not a readable crystalscope checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CrystalscopeError(f"{path}: not a crystalscope checkpoint (expected format {FORMAT})")
    validate_description(ckpt, str(path))
    return ckpt


def model_from_checkpoint(ckpt: dict) -> CrystalClassifier:
    """Rebuild the model described by a checkpoint and load its weights (eval mode)."""
    model = build_model(ckpt["backbone"], len(ckpt["class_names"]), HeadSpec.from_dict(ckpt["head"]))
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    return model


def preprocessing_from_checkpoint(ckpt: dict) -> Preprocessing:
    return Preprocessing.from_dict(ckpt["preprocessing"])
