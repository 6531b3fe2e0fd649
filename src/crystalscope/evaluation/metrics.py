"""Classification metrics from numpy arrays: per-class scores, confusion matrix, bootstrap CIs.

Training calls :func:`classification_metrics` on the whole validation split every epoch, so
everything here is vectorised numpy (one ``bincount`` builds the confusion matrix). The numbers
match scikit-learn's ``precision_recall_fscore_support(..., zero_division=0)``: a score whose
denominator is zero is reported as 0.

Label index ``i`` always means ``class_names[i]``; the names travel with the numbers so a
report can never print them in the wrong order.
"""

from __future__ import annotations

import math

import numpy as np

from crystalscope.errors import CrystalscopeError

# Resamples per vectorised chunk: bounds the (chunk x N) index matrix to a few MB.
_BOOTSTRAP_CELLS_PER_CHUNK = 4_000_000


def check_predictions(y_true, scores, class_names) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels against an (N, C) score array and class names; return numpy arrays.

    Raises:
        CrystalscopeError: mismatched lengths, wrong number of columns, labels out of range.

    Example:
        >>> y, s = check_predictions([0, 1], [[0.9, 0.1], [0.2, 0.8]], ["cex", "pg"])
        >>> y.tolist(), s.shape
        ([0, 1], (2, 2))
    """
    names = list(class_names)
    if len(names) < 2:
        raise CrystalscopeError(f"need at least 2 class names, got {names}")
    if len(set(names)) != len(names):
        raise CrystalscopeError(f"class names must be unique, got {names}")
    scores = np.asarray(scores, dtype=np.float64)
    y_true = np.asarray(y_true)
    if scores.ndim != 2 or scores.shape[1] != len(names):
        raise CrystalscopeError(
            f"model outputs have shape {scores.shape} but there are {len(names)} class names "
            f"({', '.join(names)}): expected (images, {len(names)})"
        )
    if y_true.ndim != 1 or y_true.shape[0] != scores.shape[0]:
        raise CrystalscopeError(
            f"got {y_true.shape[0] if y_true.ndim == 1 else y_true.shape} true labels but "
            f"{scores.shape[0]} rows of model outputs: they must match one per image"
        )
    if y_true.size:
        if not np.issubdtype(y_true.dtype, np.number) or np.any(y_true != np.round(y_true)):
            raise CrystalscopeError("true labels must be integer class indices")
        if y_true.min() < 0 or y_true.max() >= len(names):
            raise CrystalscopeError(
                f"true labels must lie in 0..{len(names) - 1} ({', '.join(names)}), "
                f"found {int(y_true.min())}..{int(y_true.max())}"
            )
    return y_true.astype(np.int64), scores


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix, rows = true class, columns = predicted class.

    Example:
        >>> confusion_matrix(np.array([0, 0, 1]), np.array([0, 1, 1]), 2).tolist()
        [[1, 1], [0, 1]]
    """
    flat = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _scores_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision/recall/F1 from one or many (..., C, C) confusion matrices."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    predicted = cm.sum(axis=-2).astype(np.float64)
    support = cm.sum(axis=-1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        # 2TP / (2TP + FP + FN) equals the harmonic mean and is defined whenever either is.
        f1_denominator = predicted + support
        f1 = np.where(f1_denominator > 0, 2 * tp / f1_denominator, 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support,
            "f1_defined": f1_denominator > 0}


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro and weighted averages.

    The prediction is the argmax of ``probs`` (logits give the same result).

    Args:
        y_true: true class indices, shape (N,).
        probs: class probabilities or logits, shape (N, C).
        class_names: C names; index ``i`` is ``class_names[i]``.

    Returns:
        ``{"accuracy", "per_class": {name: {"precision", "recall", "f1", "support"}},
        "macro": {"precision", "recall", "f1"}, "weighted": {...}}`` (Python floats/ints).

    Example:
        >>> m = classification_metrics([0, 1, 1], [[.9, .1], [.6, .4], [.2, .8]], ["cex", "pg"])
        >>> m["accuracy"], m["per_class"]["cex"]["precision"], m["per_class"]["pg"]["support"]
        (0.6666666666666666, 0.5, 2)
    """
    y_true, probs = check_predictions(y_true, probs, class_names)
    n_classes = len(class_names)
    cm = confusion_matrix(y_true, probs.argmax(axis=1), n_classes)
    scores = _scores_from_confusion(cm)
    support = scores["support"]
    total = float(support.sum())
    per_class = {
        name: {"precision": float(scores["precision"][i]), "recall": float(scores["recall"][i]),
               "f1": float(scores["f1"][i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    weights = support / total if total > 0 else np.zeros(n_classes)
    keys = ("precision", "recall", "f1")
    return {
        "accuracy": float(np.trace(cm) / total) if total > 0 else 0.0,
        "per_class": per_class,
        "macro": {k: float(scores[k].mean()) for k in keys},
        "weighted": {k: float(np.sum(scores[k] * weights)) for k in keys},
    }


def format_class_lines(metrics: dict) -> list[str]:
    """One line per class in the reference study's style, 4 decimals, class index order.

    Example:
        >>> m = {"per_class": {"pg": {"precision": 0.99876, "recall": 0.99824, "f1": 0.9985}}}
        >>> format_class_lines(m)
        ['pg - Precision: 0.9988, Recall: 0.9982, F1-Score: 0.9985']
    """
    return [
        f"{name} - Precision: {s['precision']:.4f}, Recall: {s['recall']:.4f}, "
        f"F1-Score: {s['f1']:.4f}"
        for name, s in metrics["per_class"].items()
    ]


def _percentile_interval(samples: np.ndarray) -> list[float] | None:
    """2.5 and 97.5 percentiles, ignoring NaN (undefined) resamples; None if all undefined."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, *,
                        n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Percentile-bootstrap 95 % intervals for accuracy, per-class F1 and macro F1.

    Images are resampled with replacement ``n_bootstrap`` times (seeded, so reports are
    reproducible). A class's F1 is left out of a resample where it is undefined (neither
    present nor predicted), so its interval describes the resamples where it means something;
    a class never present nor predicted gets ``None``. Macro F1 uses 0 for undefined classes,
    as the point estimate does.

    Returns:
        ``{"accuracy": [lo, hi], "f1": [[lo, hi] | None per class], "macro_f1": [lo, hi]}``,
        or ``None`` entries when there are no images.

    Example:
        >>> ci = bootstrap_intervals(np.array([0, 1] * 20), np.array([0, 1] * 20), 2,
        ...                          n_bootstrap=50)
        >>> ci["accuracy"]
        [1.0, 1.0]
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n_images = y_true.size
    if n_bootstrap < 1:
        raise CrystalscopeError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    if n_images == 0:
        return {"accuracy": None, "f1": [None] * n_classes, "macro_f1": None}
    rng = np.random.default_rng(seed)
    cell = y_true * n_classes + y_pred  # each image's confusion-matrix cell
    n_cells = n_classes * n_classes
    chunk = max(1, _BOOTSTRAP_CELLS_PER_CHUNK // n_images)
    accuracy, f1, macro = [], [], []
    for start in range(0, n_bootstrap, chunk):
        size = min(chunk, n_bootstrap - start)
        picks = rng.integers(0, n_images, size=(size, n_images))
        # Offset each resample's cells so one bincount builds all confusion matrices at once.
        flat = cell[picks] + (np.arange(size) * n_cells)[:, None]
        cms = np.bincount(flat.ravel(), minlength=size * n_cells).reshape(size, n_classes,
                                                                          n_classes)
        scores = _scores_from_confusion(cms)
        accuracy.append(np.trace(cms, axis1=1, axis2=2) / n_images)
        f1.append(np.where(scores["f1_defined"], scores["f1"], np.nan))
        macro.append(scores["f1"].mean(axis=1))
    accuracy, f1, macro = np.concatenate(accuracy), np.concatenate(f1), np.concatenate(macro)
    return {
        "accuracy": _percentile_interval(accuracy),
        "f1": [_percentile_interval(f1[:, i]) for i in range(n_classes)],
        "macro_f1": _percentile_interval(macro),
    }


#: The two-sided 95 % normal quantile.
Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``k / n`` (sensible at 0 and n; ``(0, 1)`` when
    ``n == 0``).

    Example:
        >>> [round(v, 3) for v in wilson_interval(0, 10)]
        [0.0, 0.278]
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # exactly 0 at k = 0 and 1 at k = n (the float arithmetic leaves ~1e-17 there)
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))
