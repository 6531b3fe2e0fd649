"""Export a checkpoint to ONNX, then prove ONNX Runtime gives the same probabilities.

The exported graph maps a normalised float32 batch ``(N, 3, H, W)`` (``N`` dynamic) to class
logits. Everything a deployment needs to feed it and read it travels inside the file, under
the ``metadata_props`` key ``crystalscope`` (JSON): backbone, class names, positive class, the
full preprocessing (size, mean, std, resize policy, interpolation, pad value), the calibration
temperature, input/output names, the input shape and the fitted rejection of foreign images
(``ood``, scored on the ``features`` output). Probabilities are
``softmax(logits / temperature)``.

Every export is checked (timm's ``check_forward`` habit): PyTorch and ONNX Runtime run on the
same real images, decoded and resized by the model's own :class:`Preprocessing`, and the export
fails with :class:`CrystalscopeError` (leaving no file under the final name) if any probability
differs by more than ``atol``.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from crystalscope.errors import CrystalscopeError, require
from crystalscope.evaluation.calibration import softmax
from crystalscope.formats import ONNX_FORMAT, ONNX_METADATA_KEY as METADATA_KEY
from crystalscope.io import atomic_path

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: second graph output: the penultimate features (``CrystalClassifier.embed``), for rejection,
#: embedding maps and drift without torch
FEATURES_NAME = "features"
# the TorchScript exporter in torch 2.14 writes opsets 7..23; ONNX Runtime >= 1.17 reads <= 20
MIN_OPSET, MAX_OPSET = 11, 23
MAX_CHECK_IMAGES = 64


def export_checkpoint(checkpoint: str | os.PathLike | dict, out_path: str | os.PathLike | None = None, *,
                      opset: int = 17, check_images: list[Path] | None = None,
                      atol: float = 1e-4) -> dict:
    """Export a crystalscope checkpoint to ONNX and verify it against PyTorch.

    Args:
        checkpoint: a ``.ckpt`` path or an in-memory checkpoint dict.
        out_path: where to write; default: next to the checkpoint with the ``.onnx`` suffix.
        opset: ONNX opset version.
        check_images: real images to compare on (unreadable ones are skipped); default a few
            generated images of different sizes and modes.
        atol: largest allowed absolute difference between the two back ends' probabilities.

    Returns:
        ``{"path", "max_abs_diff", "n_checked", "opset", "metadata"}``.

    Raises:
        CrystalscopeError: unreadable checkpoint, export failure, or a parity mismatch (then
            nothing is written under ``out_path``).

    Example:
        >>> export_checkpoint("runs/exp1/best.ckpt")["max_abs_diff"] < 1e-4  # doctest: +SKIP
        True
    """
    require("torch", "train")
    require("onnx", "train")
    from crystalscope.models.checkpoint import load_checkpoint, model_from_checkpoint

    if isinstance(checkpoint, dict):
        ckpt = checkpoint
        if out_path is None:
            raise CrystalscopeError("export: give an output path (--out) for an in-memory checkpoint")
    else:
        ckpt = load_checkpoint(checkpoint)
        out_path = Path(checkpoint).with_suffix(".onnx") if out_path is None else out_path
    out_path = Path(out_path)
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise CrystalscopeError(f"--opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} (default 17)")

    from crystalscope.data.transforms import Preprocessing

    from crystalscope.safety import check_output, output_lock

    # never onto the checkpoint or a check image (export best.ckpt --out best.ckpt)
    check_output(out_path, inputs=[None if isinstance(checkpoint, dict) else checkpoint, *(check_images or [])])
    preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
    try:
        model = model_from_checkpoint(ckpt)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CrystalscopeError(f"checkpoint weights do not match the model it describes ({first})") from None
    metadata = onnx_metadata(ckpt, preprocessing, opset)
    proto = _export_graph(model, preprocessing.image_size, int(opset))
    _attach_metadata(proto, metadata)

    batch = _check_batch(preprocessing, check_images)
    import onnx

    try:
        with output_lock(out_path), atomic_path(out_path) as tmp:
            onnx.save(proto, str(tmp))
            max_diff = parity_check(model, tmp, batch, float(ckpt.get("temperature") or 1.0), atol)
    except OSError as exc:
        raise CrystalscopeError(f"--out {out_path}: cannot write the ONNX file ({exc.strerror or exc})") from None
    return {"path": str(out_path), "max_abs_diff": max_diff, "n_checked": int(batch.shape[0]),
            "opset": int(opset), "metadata": metadata}


def onnx_metadata(ckpt: dict, preprocessing, opset: int) -> dict:
    """The JSON stored under ``metadata_props['crystalscope']``."""
    size = preprocessing.image_size
    return {
        "format": ONNX_FORMAT,
        "backbone": ckpt["backbone"],
        "class_names": list(ckpt["class_names"]),
        "positive_class": ckpt.get("positive_class"),
        "preprocessing": preprocessing.to_dict(),
        "preprocessing_spec": preprocessing.spec(),  # exact enough for a client in another language
        "temperature": float(ckpt.get("temperature") or 1.0),
        "input_name": INPUT_NAME,
        "input_shape": ["batch", 3, size, size],
        "input_layout": "NCHW float32, RGB, (pixel/255 - mean) / std after resize",
        "output_name": OUTPUT_NAME,
        "output": "logits; probabilities = softmax(logits / temperature)",
        "features_name": FEATURES_NAME,
        "features": "penultimate activations (the head's input to its last Linear layer)",
        "opset": int(opset),
        # rejection of foreign images (docs/ood.md): float32 base64, the precision matrix as
        # its upper triangle (~175 KB of JSON for 256-d features); None = not fitted
        "ood": _compact_ood(ckpt.get("ood")),
    }


def _compact_ood(ood: dict | None) -> dict | None:
    from crystalscope.evaluation.ood import OODDetector

    return OODDetector.from_dict(ood).to_dict(compact=True) if ood else None


def _LogitsAndFeatures(model):
    """The classifier as a module with two outputs: logits and the penultimate features."""
    from torch import nn

    class LogitsAndFeatures(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            features = self.inner.embed(x)
            return self.inner.head[-1](features), features

    return LogitsAndFeatures(model).eval()


def _export_graph(model, image_size: int, opset: int):
    """Trace ``model`` to an ``onnx.ModelProto`` with a dynamic batch axis.

    Uses the TorchScript exporter (``dynamo=False``): the torch.export-based default needs
    ``onnxscript``, which crystalscope does not depend on, and it handles these CNNs fine.
    """
    import onnx
    import torch

    example = torch.zeros(2, 3, image_size, image_size)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation/tracer chatter
            torch.onnx.export(
                _LogitsAndFeatures(model), (example,), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME, FEATURES_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"},
                              FEATURES_NAME: {0: "batch"}},
                do_constant_folding=True,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CrystalscopeError(f"ONNX export failed at opset {opset} ({first}); try another --opset") from None
    proto = onnx.load_model_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    return proto


def _attach_metadata(proto, metadata: dict) -> None:
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    proto.producer_name = "crystalscope"
    proto.doc_string = (f"crystalscope classifier ({metadata['backbone']}): classes "
                        f"{', '.join(metadata['class_names'])}; see metadata '{METADATA_KEY}'")


def _check_batch(preprocessing, check_images) -> np.ndarray:
    """Normalised float32 batch for the parity check, through the shared preprocessing."""
    if check_images:
        arrays = []
        for path in list(check_images)[:MAX_CHECK_IMAGES]:
            try:
                arrays.append(preprocessing.resize_uint8(path))
            except CrystalscopeError:
                continue  # a corrupt check image says nothing about the export
        if not arrays:
            raise CrystalscopeError("export check: none of the given check images could be read")
        return preprocessing.normalize(np.stack(arrays))
    return preprocessing.prepare(generated_check_images())


def generated_check_images(seed: int = 0) -> list[Image.Image]:
    """A few crystal-like test pictures in the modes and shapes real inputs come in.

    Bright blobs and needles on a dark noisy background, non-square sizes, greyscale, RGBA and
    16-bit, so the check covers the same decode/resize paths as prediction.
    """
    rng = np.random.default_rng(seed)
    images = []
    for i, (w, h) in enumerate([(151, 151), (197, 143), (130, 228), (64, 64), (210, 180)]):
        yy, xx = np.mgrid[0:h, 0:w]
        grey = 40 + rng.normal(0, 8, (h, w))
        for _ in range(6):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(4, 18)
            grey += 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        grey = np.clip(grey, 0, 255)
        if i == 1:
            images.append(Image.fromarray(grey.astype(np.uint8), mode="L"))
        elif i == 2:
            rgba = np.dstack([grey, grey * 0.9, grey * 0.8, np.full_like(grey, 200)]).astype(np.uint8)
            images.append(Image.fromarray(rgba, mode="RGBA"))
        elif i == 3:
            images.append(Image.fromarray((grey * 257).astype(np.uint16)))
        else:
            images.append(Image.fromarray(np.dstack([grey] * 3).astype(np.uint8), mode="RGB"))
    return images


def parity_check(model, onnx_path: str | os.PathLike, batch: np.ndarray, temperature: float,
                 atol: float = 1e-4) -> float:
    """Largest |p_torch - p_onnx| over ``batch``; raises if above ``atol``.

    ONNX Runtime runs the whole batch and the first image alone, which also proves the batch
    axis is dynamic.
    """
    import torch

    with torch.inference_mode():
        torch_probs = softmax(model(torch.from_numpy(batch)).numpy().astype(np.float64), temperature)
    full_logits, single_logits = _run_onnx(onnx_path, batch, batch[:1])
    onnx_probs = softmax(np.asarray(full_logits, dtype=np.float64), temperature)
    single = softmax(np.asarray(single_logits, dtype=np.float64), temperature)
    if onnx_probs.shape != torch_probs.shape:
        raise CrystalscopeError(f"export check failed: ONNX output shape {onnx_probs.shape} != PyTorch {torch_probs.shape}")
    diffs = np.abs(onnx_probs - torch_probs).max(axis=1)
    diffs = np.append(diffs, np.abs(single - torch_probs[:1]).max())
    max_diff = float(np.nanmax(diffs)) if np.isfinite(diffs).all() else float("inf")
    if not max_diff <= atol:
        worst = int(np.argmax(np.nan_to_num(diffs[:-1], nan=np.inf)))
        raise CrystalscopeError(
            f"export check failed: ONNX Runtime and PyTorch probabilities differ by {max_diff:.3g} "
            f"(> {atol:g}; worst check image #{worst}); the ONNX file was not written"
        )
    return max_diff


def _run_onnx(onnx_path: str | os.PathLike, *batches: np.ndarray) -> list[np.ndarray]:
    """Logits from ONNX Runtime for each batch (one session)."""
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_path), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CrystalscopeError(f"export check failed: ONNX Runtime cannot load the export ({first})") from None
    name = session.get_inputs()[0].name
    return [np.asarray(session.run(None, {name: b})[0]) for b in batches]
