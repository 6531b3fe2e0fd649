"""Probability calibration: softmax with a temperature, temperature fitting and the ECE.

Only numpy is imported at module level: the ONNX prediction path (which has no PyTorch and
perhaps no SciPy) uses :func:`softmax` from here. SciPy is imported inside
:func:`fit_temperature`, which only training needs.

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks") divides
the logits by one scalar ``T`` fitted on the validation split. It never changes the argmax,
so accuracy and F1 are untouched; only the confidence moves closer to the observed accuracy.
"""

from __future__ import annotations

import math

import numpy as np

from crystalscope.errors import CrystalscopeError

# Bounds of a fitted temperature (fit_temperature clips to them; Predictor accepts any positive one):
# beyond them a model is broken rather than miscalibrated.
TEMPERATURE_MIN = 0.05
TEMPERATURE_MAX = 20.0


def _as_logits(logits, name: str = "logits") -> np.ndarray:
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 1:
        raise CrystalscopeError(
            f"{name} must be a 2-D array (images x classes), got shape {array.shape}"
        )
    return array


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise CrystalscopeError(
            f"temperature must be a positive finite number, got {temperature!r}"
        )
    return temperature


def _as_labels(labels, n_images: int, n_classes: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n_images:
        raise CrystalscopeError(
            f"got {array.shape[0] if array.ndim == 1 else array.shape} labels for "
            f"{n_images} images: pass exactly one class index per image"
        )
    if array.size and (not np.issubdtype(array.dtype, np.number)
                       or np.any(array != np.round(array))):
        raise CrystalscopeError("labels must be integer class indices")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        raise CrystalscopeError(
            f"labels must lie in 0..{n_classes - 1} (one per class column), "
            f"found {int(array.min())}..{int(array.max())}"
        )
    return array


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable ``log(softmax(logits / temperature))`` along the last axis.

    Example:
        >>> round(float(log_softmax(np.array([[0.0, 0.0]]))[0, 0]), 4)
        -0.6931
    """
    scaled = _as_logits(logits) / _check_temperature(temperature)
    # Subtracting the row maximum keeps exp() from overflowing on large logits.
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities ``softmax(logits / temperature)`` per row, numerically stable.

    Args:
        logits: raw model outputs, shape (N, C).
        temperature: the calibration temperature (1.0 = uncalibrated).

    Returns:
        float64 array (N, C) whose rows sum to 1.

    Example:
        >>> softmax(np.array([[1000.0, 0.0]])).round(3).tolist()
        [[1.0, 0.0]]
    """
    return np.exp(log_softmax(logits, temperature))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray,
                            temperature: float = 1.0) -> float:
    """Mean NLL of the true classes under ``softmax(logits / temperature)``.

    Example:
        >>> round(negative_log_likelihood(np.array([[0.0, 0.0]]), np.array([1])), 4)
        0.6931
    """
    log_probs = log_softmax(logits, temperature)
    labels = _as_labels(labels, log_probs.shape[0], log_probs.shape[1])
    return float(-log_probs[np.arange(labels.size), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fit the temperature that minimises the NLL of ``softmax(logits / T)``.

    The search runs over ``log T`` (bounded, so ``T`` stays in [0.05, 20]) because the NLL is
    far better conditioned in log space than in ``T`` itself.

    Args:
        logits: validation-split logits, shape (N, C).
        labels: true class indices, shape (N,).

    Returns:
        The fitted temperature as a Python float.

    Raises:
        CrystalscopeError: on empty or mismatched inputs.

    Example:
        >>> z = np.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, 4.0]])
        >>> fit_temperature(z, np.array([0, 1, 1, 0])) > 1  # wrong half the time: soften
        True
    """
    from scipy.optimize import minimize_scalar

    logits = _as_logits(logits)
    labels = _as_labels(labels, logits.shape[0], logits.shape[1])
    if labels.size == 0:
        raise CrystalscopeError("cannot fit a temperature on zero validation images")
    if not np.all(np.isfinite(logits)):
        raise CrystalscopeError("cannot fit a temperature: the logits contain NaN or infinity")
    rows = np.arange(labels.size)

    def nll(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        shifted = scaled - scaled.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        return float(np.mean(log_norm - shifted[rows, labels]))

    result = minimize_scalar(nll, bounds=(math.log(TEMPERATURE_MIN), math.log(TEMPERATURE_MAX)),
                             method="bounded", options={"xatol": 1e-5})
    temperature = float(math.exp(result.x))
    return min(max(temperature, TEMPERATURE_MIN), TEMPERATURE_MAX)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    """Per-bin counts, mean confidence and accuracy for a reliability diagram.

    Confidence is the probability of the predicted class; bin ``b`` holds confidences in
    ``(b / n_bins, (b + 1) / n_bins]`` (a confidence of exactly 0 goes to the first bin).

    Returns:
        ``{"edges": (n_bins + 1,), "count": (n_bins,), "confidence": (n_bins,),
        "accuracy": (n_bins,)}``; empty bins have NaN confidence and accuracy.

    Example:
        >>> bins = reliability_bins(np.array([[0.9, 0.1]]), np.array([0]), n_bins=10)
        >>> int(bins["count"][8]), float(bins["accuracy"][8])
        (1, 1.0)
    """
    probs = _as_logits(probs, "probs")
    labels = _as_labels(labels, probs.shape[0], probs.shape[1])
    if int(n_bins) < 1:
        raise CrystalscopeError(f"n_bins must be at least 1, got {n_bins}")
    n_bins = int(n_bins)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bin_index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bin_index, minlength=n_bins)
    conf_sum = np.bincount(bin_index, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(bin_index, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        accuracy = np.where(count > 0, correct_sum / np.maximum(count, 1), np.nan)
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count,
            "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over bins.

    Args:
        probs: class probabilities, shape (N, C).
        labels: true class indices, shape (N,).
        n_bins: number of equal-width confidence bins on [0, 1].

    Returns:
        ECE in [0, 1] (0.0 for zero images).

    Example:
        >>> probs = np.array([[0.8, 0.2]] * 5)
        >>> round(expected_calibration_error(probs, np.array([0, 0, 0, 0, 1])), 6)
        0.0
    """
    bins = reliability_bins(probs, labels, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return 0.0
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(gaps * bins["count"][filled]) / total)
