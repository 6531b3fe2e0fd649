"""Export a checkpoint to ONNX, then prove ONNX Runtime gives the same probabilities.

The exported graph maps a normalised float32 batch ``(N, 3, H, W)`` (``N`` dynamic) to the
whole decision (:class:`crystalscope.models.rejection.DecisionModel`): class logits, the
penultimate features, the calibrated probabilities and, for a model fitted with rejection, the
OOD score and ``accepted`` (threshold inside), all computed from the input tensor. Everything a deployment needs to feed it and read it
travels inside the file, under the ``metadata_props`` key
:data:`crystalscope.formats.ONNX_METADATA_KEY` (JSON, format
:data:`crystalscope.formats.ONNX_FORMAT`; the contract is written in :mod:`crystalscope.formats`
and :func:`onnx_metadata`): backbone, class names, positive class, the full preprocessing
(size, mean, std, resize policy, interpolation, pad value), the calibration temperature,
input/output names, the input shape, the fitted rejection of foreign images (``ood``: its
parameters) and ``rejection_spec`` (what the graph's ``ood_score`` computes, in words). Probabilities are ``softmax(logits / temperature)``.

Every export is checked (timm's ``check_forward`` habit): the
:class:`~crystalscope.inference.predictor.Predictor` of the checkpoint (PyTorch, fp32: the
forward ``predict`` and ``evaluate`` run) and the Predictor of the written file (ONNX Runtime,
with the deployment's session options) run on the same real images, decoded and resized by the
model's own :class:`Preprocessing`, and the export fails with :class:`CrystalscopeError`
(leaving no file under the final name) if any probability differs by more than ``atol``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError, require
from crystalscope.formats import ONNX_ACCEPTED_NAME as ACCEPTED_NAME
from crystalscope.formats import ONNX_FORMAT, ONNX_METADATA_KEY as METADATA_KEY
from crystalscope.formats import ONNX_OOD_SCORE_NAME as OOD_SCORE_NAME
from crystalscope.formats import ONNX_PROBABILITIES_NAME as PROBABILITIES_NAME
from crystalscope.inference.predictor import Predictor
from crystalscope.io import atomic_path
from crystalscope.runtime import first_line

log = logging.getLogger(__name__)

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
    """Export a crystalscope checkpoint to ONNX and verify it against the PyTorch Predictor.

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
    from crystalscope.safety import check_output

    ckpt, out_path = _read_checkpoint(checkpoint, out_path)
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise CrystalscopeError(f"--opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} (default 17)")
    # never onto the checkpoint or a check image (export best.ckpt --out best.ckpt)
    check_output(out_path, inputs=[None if isinstance(checkpoint, dict) else checkpoint, *(check_images or [])])
    preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
    metadata = onnx_metadata(ckpt, preprocessing, opset)
    proto = _export_graph(_decision(_model(ckpt), ckpt, preprocessing), preprocessing.image_size, int(opset))
    _attach_metadata(proto, metadata)
    # the reference: the forward every reported number comes from (CPU, fp32, no rejection needed)
    reference = Predictor.from_checkpoint(ckpt, device="cpu")
    batch = _check_batch(preprocessing, check_images)
    max_diff = _save_checked(proto, out_path, reference, batch, atol)
    log.debug("%s: ONNX Runtime matches PyTorch on %d images (max |dp| %.1e)", out_path, len(batch), max_diff)
    return {"path": str(out_path), "max_abs_diff": max_diff, "n_checked": int(batch.shape[0]),
            "opset": int(opset), "metadata": metadata}


def _read_checkpoint(checkpoint: str | os.PathLike | dict, out_path) -> tuple[dict, Path]:
    """The checkpoint dict and the output path (default: the checkpoint's, with ``.onnx``)."""
    from crystalscope.models.checkpoint import load_checkpoint

    if isinstance(checkpoint, dict):
        if out_path is None:
            raise CrystalscopeError("export: give an output path (--out) for an in-memory checkpoint")
        return checkpoint, Path(out_path)
    ckpt = load_checkpoint(checkpoint)
    return ckpt, Path(checkpoint).with_suffix(".onnx") if out_path is None else Path(out_path)


def _model(ckpt: dict):
    """The checkpoint's model on the CPU, to trace; one line when its weights do not fit it."""
    from crystalscope.models.checkpoint import model_from_checkpoint

    try:
        return model_from_checkpoint(ckpt)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CrystalscopeError(f"checkpoint weights do not match the model it describes "
                                f"({first_line(exc, 160)})") from None


def _save_checked(proto, out_path: Path, reference: Predictor, batch: np.ndarray, atol: float) -> float:
    """Write ``proto`` under ``out_path`` only if it passes :func:`parity_check`; the max difference."""
    import onnx

    from crystalscope.safety import output_lock

    try:
        with output_lock(out_path), atomic_path(out_path) as staging:
            onnx.save(proto, str(staging))
            return parity_check(reference, staging, batch, atol)
    except OSError as exc:
        raise CrystalscopeError(f"--out {out_path}: cannot write the ONNX file ({exc.strerror or exc})") from None


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
        "probabilities_name": PROBABILITIES_NAME,
        "rejection_spec": rejection_spec(ckpt.get("ood"), preprocessing),
    }


def rejection_spec(ood: dict | None, preprocessing) -> dict | None:
    """The rejection of foreign images stated completely, for a client that reads only the file.

    The graph computes it (outputs ``ood_score`` and ``accepted``); this says what it computes,
    so the decision can be checked or reimplemented without crystalscope's source.
    """
    if not ood:
        return None
    size = preprocessing.image_size
    return {
        "outputs": {OOD_SCORE_NAME: "float64 (N,): higher = more foreign",
                    ACCEPTED_NAME: f"bool (N,): {OOD_SCORE_NAME} <= threshold (rejected when >)"},
        "method": ood["method"], "threshold": float(ood["threshold"]), "comparison": "reject if score > threshold",
        "input": (f"the model input tensor (N, 3, {size}, {size}); pixels = round((x * std + mean) * 255) "
                  "clipped to 0..255, / 255 (the resized 8-bit image on 0-1); grey = ((R + G) + B) / 3"),
        "score": {
            "mahalanobis": "min over classes c of (f - means[c]) @ precision @ (f - means[c]), f = features output",
            "image_statistics": ("the same on the 42 image statistics s (first pixel_means.shape[1] of them), "
                                 "with pixel_means and pixel_precision"),
            "mahalanobis+image_statistics": "max(mahalanobis / scales[0], image_statistics / scales[1])",
            "energy": "-logsumexp(logits)", "max_logit": "-max(logits)",
        }[ood["method"]],
        "parameters": ("under 'ood'.params: float32 little-endian base64 arrays with their shape; "
                       "'upper_triangle': true means the row-major upper triangle (i <= j) of a "
                       "symmetric matrix"),
        "image_statistics": IMAGE_STATISTICS_SPEC,
    }


#: the 42 statistics in column order, as the graph computes them (numpy reference:
#: crystalscope.evaluation.ood.image_statistics); quantiles are linear (numpy's default)
IMAGE_STATISTICS_SPEC = [
    "mean(grey)", "log(std(grey) + 1e-3) (population std)",
    "quantiles 0.01, 0.1, 0.5, 0.9, 0.99 of grey (5 columns)",
    "log(mean(max(R,G,B) - min(R,G,B)) + 1e-3)", "log(mean(grey < 0.02) + 1e-3)", "log(mean(grey > 0.98) + 1e-3)",
    "log(fine + 1e-3), fine = mean|grey[y+1,x]-grey[y,x]| + mean|grey[y,x+1]-grey[y,x]|",
    "log(coarse + 1e-3): the same on the 4x4-block means (edges beyond whole blocks dropped)",
    "log(mean|grey - its 4x4-block mean| + 1e-3) over the whole blocks",
    "log(fraction + 1e-3) of pixels with floor(min(grey * 8, 8)) = k, k = 0..7, bin 8 counted in 7 (8 columns)",
    "log(q + 1e-3), q = quantiles 0.1, 0.5, 0.9 of the population std of 8x8 blocks (3 columns)",
    "quantiles 0.1, 0.9 of the 8x8-block means (2 columns)",
    ("log(fraction + 1e-3) of inner pixels with k of their 8 neighbours > centre + 0.02, k = 0..8 (9 columns)"),
    ("spectrum: P = |rfft2(grey - mean(grey))|^2; band b = mean of P over cells whose radius hypot(fftfreq(H), "
     "rfftfreq(W)) lies in [e_b, e_b+1), e = geomspace(2/min(H,W), 0.5, 9); y_b = log(band_b + 1e-12); "
     "least-squares line of y against log(sqrt(e_b * e_b+1)): its slope, then the residuals of bands 1..6 "
     "(7 columns)"),
]


def _compact_ood(ood: dict | None) -> dict | None:
    from crystalscope.evaluation.ood import OODDetector

    return OODDetector.from_dict(ood).to_dict(compact=True) if ood else None


def _decision(model, ckpt: dict, preprocessing):
    """The classifier's :class:`~crystalscope.models.rejection.DecisionModel` (what the graph computes)."""
    from crystalscope.evaluation.ood import OODDetector
    from crystalscope.models.rejection import decision_model

    detector = OODDetector.from_dict(ckpt["ood"]) if ckpt.get("ood") else None
    return decision_model(model, preprocessing, float(ckpt.get("temperature") or 1.0), detector).eval()


def _output_names(with_rejection: bool) -> list[str]:
    names = [OUTPUT_NAME, FEATURES_NAME, PROBABILITIES_NAME]
    return names + [OOD_SCORE_NAME, ACCEPTED_NAME] if with_rejection else names


def _export_graph(model, image_size: int, opset: int):
    """Trace ``model`` (a DecisionModel) to an ``onnx.ModelProto`` with a dynamic batch axis.

    Uses the TorchScript exporter (``dynamo=False``): the torch.export-based default needs
    ``onnxscript``, which crystalscope does not depend on, and it handles these CNNs fine.
    """
    import onnx
    import torch

    example = torch.zeros(2, 3, image_size, image_size)
    outputs = _output_names(model.score is not None)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation/tracer chatter
            torch.onnx.export(
                model, (example,), buffer, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]},
                do_constant_folding=True,
            )
    except Exception as exc:
        raise CrystalscopeError(f"ONNX export failed at opset {opset} ({first_line(exc)}); try another --opset") from None
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


def parity_check(reference: Predictor, onnx_path: str | os.PathLike, batch: np.ndarray,
                 atol: float = 1e-4) -> float:
    """Largest |p_torch - p_onnx| over ``batch``; raises if above ``atol``.

    ``reference`` is the checkpoint's PyTorch :class:`Predictor`; the ONNX file is run by its
    own Predictor (its metadata's temperature, the deployment's session options) on the whole
    batch and on the first image alone, which also proves the batch axis is dynamic.

    Example:
        >>> parity_check(Predictor.from_checkpoint(ckpt), "model.onnx", batch)  # doctest: +SKIP
        3.1e-07
    """
    exported = _load_export(onnx_path, reject=reference.rejection is not None)
    _check_decisions(reference, exported, batch)
    expected = reference.probabilities(batch)
    full, single = exported.probabilities(batch), exported.probabilities(batch[:1])
    if full.shape != expected.shape:
        raise CrystalscopeError(f"export check failed: ONNX output shape {full.shape} != PyTorch {expected.shape}")
    diffs = np.append(np.abs(full - expected).max(axis=1), np.abs(single - expected[:1]).max())
    max_diff = float(np.nanmax(diffs)) if np.isfinite(diffs).all() else float("inf")
    if not max_diff <= atol:
        worst = int(np.argmax(np.nan_to_num(diffs[:-1], nan=np.inf)))
        raise CrystalscopeError(
            f"export check failed: ONNX Runtime and PyTorch probabilities differ by {max_diff:.3g} "
            f"(> {atol:g}; worst check image #{worst}); the ONNX file was not written"
        )
    return max_diff


def _check_decisions(reference: Predictor, exported: Predictor, batch: np.ndarray) -> None:
    """The graph's accept/reject equals the checkpoint's on every check image (scores within 1e-4 relative)."""
    if reference.rejection is None:
        return
    expected, got = reference.forward(batch)[1], exported.forward(batch)[1]
    threshold = reference.rejection.threshold
    close = np.abs(got - expected) <= 1e-4 * np.maximum(np.abs(expected), abs(threshold))
    same = (expected > threshold) == (got > threshold)
    if not (close.all() and same.all()):
        worst = int(np.argmin(close & same))
        raise CrystalscopeError(f"export check failed: the graph's OOD score {got[worst]:.6g} differs from "
                                f"PyTorch's {expected[worst]:.6g} (check image #{worst}); the ONNX file was not written")


def _load_export(onnx_path: str | os.PathLike, reject: bool = False) -> Predictor:
    """The Predictor of the file just written (under its staging name), for the check."""
    try:
        return Predictor.from_onnx(onnx_path, reject=reject)
    except CrystalscopeError as exc:
        raise CrystalscopeError(f"export check failed: ONNX Runtime cannot load the export ({exc})") from None
