"""Rejection of foreign images: an out-of-distribution (OOD) score and its threshold.

The score is fitted once at the end of training on the penultimate features
(:meth:`crystalscope.models.factory.CrystalClassifier.embed`) of the training images, and the
threshold is the ``1 - target_fpr`` quantile of the validation images' scores, so about
``target_fpr`` of in-distribution images are rejected. A higher score means "more foreign";
an image is rejected when its score exceeds the threshold.

``mahalanobis`` is the squared distance of a feature vector to the nearest class mean under one
covariance shared by all classes (Lee et al. 2018); ``image_statistics`` is the same distance
on 42 low-level statistics of the resized image (:func:`image_statistics`: brightness, spread,
saturation, clipping, gradients, histogram, block contrast, and texture: a neighbour-count
histogram and the power spectrum). The default,
``mahalanobis+image_statistics``, takes the larger of the two, each divided by its own
validation threshold (``docs/ood.md`` compares the candidates): the statistics catch blank,
clipped, noisy and coloured frames and, with the texture columns, grey natural textures; the
features add the network's view of the content (photos, text and checkerboards). ``energy``
(``-logsumexp(logits)``) and ``max_logit`` (``-max(logits)``) need no fitted parameters and
are kept for comparison.

Numpy only, so the ONNX Runtime path rejects without torch. The fitted parameters are plain
lists and floats (:meth:`OODDetector.to_dict`), so they store in a checkpoint that
``torch.load(weights_only=True)`` reads, and compactly (float32, base64) in the ONNX metadata.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass, field

import numpy as np

from crystalscope.errors import CrystalscopeError

FEATURES_AND_PIXELS = "mahalanobis+image_statistics"
METHODS = (FEATURES_AND_PIXELS, "mahalanobis", "image_statistics", "energy", "max_logit")
DEFAULT_METHOD = FEATURES_AND_PIXELS
DEFAULT_TARGET_FPR = 0.01
# covariance shrinkage towards a scaled identity: post-ReLU features have dead units, so the
# plain sample covariance is singular
SHRINKAGE = 0.05


@dataclass
class OODDetector:
    """A fitted OOD score plus the threshold above which an image is rejected.

    Attributes:
        method: one of :data:`METHODS`.
        threshold: scores above it are rejected.
        target_fpr: the fraction of validation images the threshold rejects (by design).
        params: method parameters as float64 arrays (``means`` (C, D), ``precision`` (D, D)).
        val_rejection_rate: the measured fraction of validation images above the threshold.
    """

    method: str
    threshold: float
    target_fpr: float
    params: dict[str, np.ndarray] = field(default_factory=dict)
    val_rejection_rate: float | None = None

    @property
    def needs_images(self) -> bool:
        """Whether :meth:`score` needs ``image_stats`` (:func:`image_statistics` of the inputs)."""
        return "image_statistics" in self.method

    def score(self, features: np.ndarray, logits: np.ndarray, image_stats: np.ndarray | None = None) -> np.ndarray:
        """OOD scores ``(N,)`` for penultimate ``features (N, D)``, ``logits (N, C)`` and, when
        :attr:`needs_images`, ``image_stats`` ``(N, 42)`` of the resized uint8 inputs.

        Example:
            >>> det = OODDetector("energy", threshold=0.0, target_fpr=0.01)
            >>> det.score(np.zeros((1, 4)), np.array([[2.0, -1.0]])).round(3).tolist()
            [-2.049]
        """
        return method_score(self.method, self.params, features, logits, image_stats)

    def rejected(self, scores: np.ndarray) -> np.ndarray:
        """Boolean mask: which scores exceed the threshold."""
        return np.asarray(scores) > self.threshold

    def to_dict(self, compact: bool = False) -> dict:
        """Plain data for a checkpoint (lists) or, with ``compact``, for ONNX metadata JSON.

        Compact arrays are float32, base64-encoded; a symmetric ``precision`` keeps only its
        upper triangle (half the bytes).
        """
        params = {}
        for name, value in self.params.items():
            value = np.asarray(value, dtype=np.float64)
            if compact and name.endswith("precision"):
                params[name] = _encode(value[np.triu_indices(value.shape[0])], shape=value.shape, triangle=True)
            elif compact:
                params[name] = _encode(value, shape=value.shape)
            else:
                params[name] = value.tolist()
        return {"method": self.method, "threshold": float(self.threshold), "target_fpr": float(self.target_fpr),
                "val_rejection_rate": self.val_rejection_rate, "params": params}

    @classmethod
    def from_dict(cls, data: dict) -> "OODDetector":
        """Inverse of :meth:`to_dict` (either form).

        Raises:
            CrystalscopeError: unknown method or malformed parameters.
        """
        try:
            method = str(data["method"])
            if method not in METHODS:
                raise ValueError(f"unknown method {method!r}")
            params = {k: _decode(v) for k, v in (data.get("params") or {}).items()}
            return cls(method=method, threshold=float(data["threshold"]), target_fpr=float(data["target_fpr"]),
                       params=params, val_rejection_rate=data.get("val_rejection_rate"))
        except (KeyError, TypeError, ValueError) as exc:
            raise CrystalscopeError(f"the model's rejection parameters are malformed ({exc}); "
                                    "retrain, or predict with --no-reject") from None


def _encode(values: np.ndarray, shape, triangle: bool = False) -> dict:
    raw = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return {"float32_b64": base64.b64encode(raw).decode("ascii"), "shape": list(shape), "upper_triangle": triangle}


def _decode(value) -> np.ndarray:
    if not isinstance(value, dict):
        return np.asarray(value, dtype=np.float64)
    flat = np.frombuffer(base64.b64decode(value["float32_b64"]), dtype="<f4").astype(np.float64)
    shape = tuple(int(s) for s in value["shape"])
    if not value.get("upper_triangle"):
        return flat.reshape(shape)
    full = np.zeros(shape)
    rows, cols = np.triu_indices(shape[0])
    full[rows, cols] = flat
    full[cols, rows] = flat
    return full


# ---- the scores ---------------------------------------------------------------------------


def method_score(method: str, params: dict, features: np.ndarray, logits: np.ndarray,
                 image_stats: np.ndarray | None = None) -> np.ndarray:
    """The OOD score of ``method`` (higher = more foreign); see the module docstring."""
    if "image_statistics" in method and image_stats is None:
        raise CrystalscopeError(f"rejection method {method}: needs the image statistics of the inputs")
    if method == FEATURES_AND_PIXELS:
        scales = params["scales"]
        return np.maximum(method_score("mahalanobis", params, features, logits) / scales[0],
                          method_score("image_statistics", params, features, logits, image_stats) / scales[1])
    if method == "image_statistics":
        # a model fitted before the texture columns existed uses the first 26 (the same ones)
        columns = np.asarray(params["pixel_means"]).shape[1]
        return mahalanobis_score(np.asarray(image_stats, dtype=np.float64)[:, :columns], params["pixel_means"],
                                 params["pixel_precision"])
    logits = np.asarray(logits, dtype=np.float64)
    if method == "energy":
        top = logits.max(axis=1)
        return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))
    if method == "max_logit":
        return -logits.max(axis=1)
    if method == "mahalanobis":
        return mahalanobis_score(np.asarray(features, dtype=np.float64), params["means"], params["precision"])
    raise CrystalscopeError(f"unknown rejection method {method!r}: use one of {', '.join(METHODS)}")


def mahalanobis_score(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest class mean, shape ``(N,)``.

    Example:
        >>> mahalanobis_score(np.array([[3.0, 0.0]]), np.zeros((1, 2)), np.eye(2)).tolist()
        [9.0]
    """
    distances = []
    for mean in np.asarray(means):
        delta = features - mean
        distances.append(np.einsum("nd,de,ne->n", delta, precision, delta))
    return np.min(np.stack(distances, axis=1), axis=1)


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, n_classes: int,
                    shrinkage: float = SHRINKAGE) -> dict[str, np.ndarray]:
    """Class means and the shared (shrunk) precision matrix of training features.

    Raises:
        CrystalscopeError: a class has no training features.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> p = fit_mahalanobis(rng.normal(size=(40, 3)), np.arange(40) % 2, 2)
        >>> p["means"].shape, p["precision"].shape
        ((2, 3), (3, 3))
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    means = []
    for c in range(n_classes):
        rows = features[labels == c]
        if len(rows) == 0:
            raise CrystalscopeError(f"rejection fit: class #{c} has no training images")
        means.append(rows.mean(axis=0))
    means = np.stack(means)
    centred = features - means[labels]
    covariance = centred.T @ centred / max(len(features) - n_classes, 1)
    scale = float(np.trace(covariance)) / covariance.shape[0] or 1.0
    covariance = (1 - shrinkage) * covariance + shrinkage * scale * np.eye(covariance.shape[0])
    return {"means": means, "precision": np.linalg.inv(covariance)}


# ---- fit and threshold --------------------------------------------------------------------


def threshold_for_fpr(scores: np.ndarray, target_fpr: float) -> float:
    """The threshold that rejects about ``target_fpr`` of ``scores`` (in-distribution ones).

    Example:
        >>> threshold_for_fpr(np.arange(100.0), 0.05)
        95.0
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        raise CrystalscopeError("rejection fit: no validation images to set the threshold on")
    return float(np.quantile(scores, 1.0 - target_fpr, method="higher"))


def fit_detector(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                 val_logits: np.ndarray, n_classes: int, target_fpr: float = DEFAULT_TARGET_FPR,
                 method: str = DEFAULT_METHOD, train_image_stats: np.ndarray | None = None,
                 val_image_stats: np.ndarray | None = None) -> OODDetector:
    """Fit ``method`` on the training split and its threshold on the validation split.

    The image statistics (:func:`image_statistics`) are needed by the methods that use them.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> train, val = rng.normal(size=(200, 4)), rng.normal(size=(400, 4))
        >>> det = fit_detector(train, np.arange(200) % 2, val, np.zeros((400, 2)), 2, 0.05, "mahalanobis")
        >>> round(det.val_rejection_rate, 2)
        0.05
    """
    if not 0.0 < target_fpr < 1.0:
        raise CrystalscopeError(f"--reject-fpr {target_fpr} must be between 0 and 1 (0 turns the fit off)")
    if method not in METHODS:
        raise CrystalscopeError(f"unknown rejection method {method!r}: use one of {', '.join(METHODS)}")
    params: dict[str, np.ndarray] = {}
    if "mahalanobis" in method:
        params.update(fit_mahalanobis(train_features, train_labels, n_classes))
    if "image_statistics" in method:
        if train_image_stats is None or val_image_stats is None:
            raise CrystalscopeError(f"rejection method {method}: needs the image statistics of train and val")
        pixels = fit_mahalanobis(train_image_stats, train_labels, n_classes)
        params.update(pixel_means=pixels["means"], pixel_precision=pixels["precision"])
    if method == FEATURES_AND_PIXELS:
        # each part over its own val threshold, so neither dominates by its units
        params["scales"] = np.array([
            threshold_for_fpr(method_score(part, params, val_features, val_logits, val_image_stats), target_fpr)
            for part in ("mahalanobis", "image_statistics")])
    val_scores = method_score(method, params, val_features, val_logits, val_image_stats)
    threshold = threshold_for_fpr(val_scores, target_fpr)
    return OODDetector(method=method, threshold=threshold, target_fpr=float(target_fpr), params=params,
                       val_rejection_rate=float(np.mean(val_scores > threshold)))


# ---- measurement --------------------------------------------------------------------------


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling foreign images (positives) from in-distribution ones.

    The probability that a random foreign image scores higher than a random in-distribution
    one (ties count half).

    Example:
        >>> auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
        1.0
    """
    in_scores, out_scores = np.asarray(in_scores, float), np.asarray(out_scores, float)
    if len(in_scores) == 0 or len(out_scores) == 0:
        return float("nan")
    ordered = np.sort(in_scores)
    below = np.searchsorted(ordered, out_scores, side="left")
    at_or_below = np.searchsorted(ordered, out_scores, side="right")
    return float(np.mean(below + 0.5 * (at_or_below - below)) / len(ordered))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of in-distribution images rejected by the threshold that rejects ``tpr`` of the foreign ones.

    Example:
        >>> fpr_at_tpr(np.arange(10.0), np.arange(5.0, 25.0))
        0.5
    """
    in_scores, out_scores = np.asarray(in_scores, float), np.asarray(out_scores, float)
    if len(in_scores) == 0 or len(out_scores) == 0:
        return float("nan")
    # the largest threshold t with mean(out >= t) >= tpr
    threshold = np.quantile(out_scores, 1.0 - tpr, method="lower")
    return float(np.mean(in_scores >= threshold))


# ---- image statistics ---------------------------------------------------------------------

#: names of the columns of :func:`image_statistics`; texture columns come last, so a model
#: fitted on the first 26 (before they existed) scores on those 26 (:func:`method_score`)
IMAGE_STATISTICS = (("mean", "std", "q01", "q10", "q50", "q90", "q99", "saturation", "dark", "bright",
                     "fine_gradient", "coarse_gradient", "high_frequency")
                    + tuple(f"histogram_{i}" for i in range(8))
                    + ("local_std_q10", "local_std_q50", "local_std_q90", "block_mean_q10", "block_mean_q90")
                    + tuple(f"brighter_neighbours_{k}" for k in range(9))
                    + ("spectrum_slope",) + tuple(f"spectrum_residual_{i}" for i in range(1, 7)))
#: how much brighter (on 0-1) a neighbour must be to count in the neighbour histogram
NEIGHBOUR_STEP = 0.02
SPECTRUM_BANDS = 8


def image_statistics(images: np.ndarray) -> np.ndarray:
    """Low-level statistics of resized uint8 images ``(N, H, W, 3)`` -> ``(N, 42)``.

    Brightness and its spread, quantiles, colour saturation, clipped fractions, fine and
    coarse gradient energy, high-frequency energy, an 8-bin grey histogram and the spread of
    8x8-block contrast and brightness (columns: :data:`IMAGE_STATISTICS`): what separates a
    crystal crop from a blank, clipped, noisy, coloured or textured frame, whatever the
    network makes of it. Then texture (:func:`texture_statistics`), which separates grey
    natural textures (gravel, grass) from crystal crops. Spreads and fractions are on a log
    scale: a blank frame's zero gradient or a grey crop's zero saturation must be far from
    small positive values.

    Example:
        >>> image_statistics(np.zeros((2, 16, 16, 3), np.uint8)).shape
        (2, 42)
    """
    images = np.asarray(images, dtype=np.uint8)
    n = len(images)
    # per-channel planes instead of reductions over the last axis of length 3 (numpy's slowest
    # case); the same float32 operations in the same order, so the same numbers bit for bit
    levels = np.arange(256, dtype=np.float32) / 255.0
    planes = [images[..., c] for c in range(3)]
    red, green, blue = (levels[plane] for plane in planes)
    grey = ((red + green) + blue) / np.float32(3)
    flat = grey.reshape(n, -1)
    quantiles = np.quantile(flat, [0.01, 0.1, 0.5, 0.9, 0.99], axis=1).T
    # the largest minus the smallest channel, taken on uint8 (division by 255 keeps the order)
    largest = np.maximum(np.maximum(planes[0], planes[1]), planes[2])
    smallest = np.minimum(np.minimum(planes[0], planes[1]), planes[2])
    saturation = (levels[largest] - levels[smallest]).reshape(n, -1).mean(axis=1)
    fine = np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2))
    small = _blocks(grey, 4).mean(axis=(2, 4))
    coarse = np.abs(np.diff(small, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(small, axis=2)).mean(axis=(1, 2))
    h, w = small.shape[1] * 4, small.shape[2] * 4
    high = np.abs(grey[:, :h, :w] - np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)).mean(axis=(1, 2))
    histogram = _grey_histogram(flat)
    blocks = _blocks(grey, 8)
    local_std = np.quantile(blocks.std(axis=(2, 4)).reshape(n, -1), [0.1, 0.5, 0.9], axis=1).T
    block_mean = np.quantile(blocks.mean(axis=(2, 4)).reshape(n, -1), [0.1, 0.9], axis=1).T
    logs = np.log(np.column_stack([flat.std(axis=1), saturation, (flat < 0.02).mean(axis=1),
                                   (flat > 0.98).mean(axis=1), fine, coarse, high, histogram, local_std]) + 1e-3)
    return np.column_stack([flat.mean(axis=1), logs[:, 0], quantiles, logs[:, 1:], block_mean,
                            texture_statistics(grey)]).astype(np.float64)


def _grey_histogram(flat: np.ndarray) -> np.ndarray:
    """8 bins of width 1/8 over 0-1 (1.0 itself in the last bin), as fractions of the pixels.

    ``floor(x * 8)`` is the bin exactly (times 8 is exact in binary floating point); one
    ``bincount`` per image instead of 16 comparisons over every pixel.
    """
    counts = _row_counts(np.minimum(flat * 8, 8).astype(np.int64), 9) / flat.shape[1]
    fractions = counts[:, :8].copy()
    fractions[:, 7] += counts[:, 8]  # added as its own fraction, as the bin edges were defined
    return fractions


def _row_counts(values: np.ndarray, levels: int) -> np.ndarray:
    """``(N, levels)``: how often each integer 0..levels-1 occurs in each row of ``values`` (N, ...)."""
    n = len(values)
    offsets = (np.arange(n, dtype=np.int64) * levels).reshape((n,) + (1,) * (values.ndim - 1))
    return np.bincount((values + offsets).ravel(), minlength=n * levels).reshape(n, levels).astype(np.float64)


def texture_statistics(grey: np.ndarray) -> np.ndarray:
    """Texture of grey images ``(N, H, W)`` in 0-1 -> ``(N, 16)``: neighbour counts and spectrum.

    * ``brighter_neighbours_k`` (9, log fractions): for each inner pixel, how many of its 8
      neighbours are brighter by more than :data:`NEIGHBOUR_STEP` (a rotation-invariant,
      LBP-like histogram). Gravel and grass are dense with small bright and dark grains, so
      many pixels are local extremes (0 or 8); crystal crops are smooth needles and blobs
      on a dark background.
    * ``spectrum_slope`` and ``spectrum_residual_1..6``: the radially averaged power spectrum
      in 8 log-spaced frequency bands, the slope of a line fitted to log power against log
      frequency, and the inner six bands' residuals from that line (the outer two follow
      from them, so they are left out: no column is a linear combination of others).
      Natural photos fall off more slowly (flatter slope) than the smooth crystal crops.

    Example:
        >>> texture_statistics(np.zeros((1, 16, 16))).shape
        (1, 16)
    """
    n, h, w = grey.shape
    centre = grey[:, 1:-1, 1:-1]
    threshold = centre + NEIGHBOUR_STEP  # once, not once per neighbour
    brighter = np.zeros(centre.shape, dtype=np.int8)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                brighter += grey[:, 1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] > threshold
    counts = _row_counts(brighter.astype(np.int64), 9) / max(brighter[0].size if n else 1, 1)
    power = (np.abs(np.fft.rfft2(grey - grey.mean(axis=(1, 2), keepdims=True))) ** 2).reshape(n, -1)
    edges, rings = _spectrum_rings(h, w)
    # a tiny image can leave a ring empty: level 0 (log 1e-12), not a NaN; the count is a numpy
    # integer as it always was (float32 / numpy int is float64), so fitted thresholds still hold
    bands = np.log(np.stack([power[:, ring].sum(axis=1) / max(np.int64(ring.size), 1) for ring in rings], axis=1) + 1e-12)
    log_frequency = np.log(np.sqrt(edges[:-1] * edges[1:]))
    slope, intercept = np.polyfit(log_frequency, bands.T, 1) if n else np.zeros((2, 0))
    residuals = bands - (slope[:, None] * log_frequency + intercept[:, None])
    return np.column_stack([np.log(counts + 1e-3), slope, residuals[:, 1:-1]])


@functools.lru_cache(maxsize=8)
def _spectrum_rings(h: int, w: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Band edges and, per band, the flat indices of the ``rfft2`` cells whose radius is in it."""
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
    edges = np.geomspace(2.0 / min(h, w), 0.5, SPECTRUM_BANDS + 1)
    return edges, [np.flatnonzero((radius >= lo) & (radius < hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def _blocks(grey: np.ndarray, size: int) -> np.ndarray:
    """``(N, H/size, size, W/size, size)`` view of ``(N, H, W)`` (edges beyond a whole block dropped)."""
    h, w = (grey.shape[1] // size) * size, (grey.shape[2] // size) * size
    return grey[:, :h, :w].reshape(len(grey), h // size, size, w // size, size)
