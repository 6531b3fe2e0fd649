"""Per-class statistics and the metadata-only baseline (how far size alone predicts the class).

A cross-validated classifier that sees only width, height, aspect and intensity statistics
measures how much a model could learn without looking at the crystal: a shortcut.
scikit-learn is imported when needed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from crystalscope.data.audit.fingerprint import ImageRecord
from crystalscope.errors import require

METADATA_FEATURES = ("width", "height", "aspect", "mean_intensity", "std_intensity")
#: per class: n, width, height, aspect, mean_intensity, std_intensity, most_common_sizes
ClassStats = dict[str, dict]


@dataclass
class MetadataBaseline:
    """Cross-validated accuracy of a classifier that sees only image metadata.

    ``accuracy`` is None (and ``message`` says why) when it could not be computed;
    ``warning_threshold`` and ``feature_importance`` exist only when it was.
    """

    model: str = "decision tree (max_depth=4)"
    features: list[str] = field(default_factory=lambda: list(METADATA_FEATURES))
    accuracy: float | None = None
    accuracy_std: float | None = None
    chance_accuracy: float | None = None
    cv_folds: int = 0
    shortcut_warning: bool = False
    message: str = ""
    warning_threshold: float | None = None
    feature_importance: dict[str, float] | None = None

    def to_json(self) -> dict:
        """The ``metadata_baseline`` entry of ``audit.json`` (keys of what was computed only)."""
        data = asdict(self)
        for key in ("warning_threshold", "feature_importance"):
            if data[key] is None:
                del data[key]
        return data


def _describe(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"min": float(array.min()), "max": float(array.max()),
            "mean": round(float(array.mean()), 3), "std": round(float(array.std()), 3)}


def class_statistics(records: Sequence[ImageRecord], classes: Sequence[str]) -> ClassStats:
    """Per class: width, height, aspect (w/h), mean and std intensity, most common sizes."""
    stats: ClassStats = {}
    for class_name in sorted(set(classes)):
        rows = [r for r, c in zip(records, classes) if c == class_name and r.readable]
        if not rows:
            continue
        sizes = Counter(f"{r.width}x{r.height}" for r in rows)
        stats[class_name] = {
            "n": len(rows),
            "width": _describe([r.width for r in rows]),
            "height": _describe([r.height for r in rows]),
            "aspect": _describe([r.width / r.height for r in rows]),
            "mean_intensity": _describe([r.mean_intensity for r in rows]),
            "std_intensity": _describe([r.std_intensity for r in rows]),
            "most_common_sizes": [{"size": s, "fraction": round(n / len(rows), 4)}
                                  for s, n in sizes.most_common(3)],
        }
    return stats


def metadata_baseline(records: Sequence[ImageRecord], classes: Sequence[str],
                      groups: Sequence[str], seed: int = 0) -> MetadataBaseline:
    """Cross-validated accuracy of a depth-4 decision tree that sees only image metadata.

    Folds never split a duplicate group (``groups``), so a crystal's views cannot help each
    other. A score far above chance means size or brightness alone reveals the class: a
    shortcut a CNN can learn instead of the crystal's shape. "Far above" is defined as more
    than halfway from chance to perfect (0.75 for two balanced classes).

    Example:
        >>> metadata_baseline(records, classes, groups).accuracy  # doctest: +SKIP
        0.998
    """
    require("sklearn", "train")
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    rows = [(r, c, g) for r, c, g in zip(records, classes, groups) if r.readable]
    labels = sorted({c for _, c, _ in rows})
    result = MetadataBaseline()
    groups_per_class = [len({g for _, c, g in rows if c == label}) for label in labels]
    folds = min([5] + groups_per_class)
    if len(labels) < 2 or folds < 2:
        result.message = "not computed: needs two classes with at least two independent images each"
        return result
    x = np.array([[r.width, r.height, r.width / r.height, r.mean_intensity, r.std_intensity]
                  for r, _, _ in rows])
    y = np.array([labels.index(c) for _, c, _ in rows])
    model = DecisionTreeClassifier(max_depth=4, random_state=seed)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_score(model, x, y, groups=[g for _, _, g in rows], cv=cv)
    chance = float(np.bincount(y).max() / len(y))
    accuracy = float(scores.mean())
    importances = model.fit(x, y).feature_importances_
    threshold = chance + 0.5 * (1.0 - chance)
    result.accuracy, result.accuracy_std = round(accuracy, 4), round(float(scores.std()), 4)
    result.chance_accuracy, result.cv_folds = round(chance, 4), folds
    result.warning_threshold = round(threshold, 4)
    result.feature_importance = {f: round(float(v), 4) for f, v in zip(METADATA_FEATURES, importances)}
    result.shortcut_warning = accuracy >= threshold
    result.message = _baseline_message(result, accuracy, chance)
    return result


def _baseline_message(result: MetadataBaseline, accuracy: float, chance: float) -> str:
    if result.shortcut_warning:
        top = max(result.feature_importance, key=result.feature_importance.get)
        return (f"SHORTCUT WARNING: image metadata alone (mostly {top}) predicts the class "
                f"with {accuracy:.2%} accuracy (chance {chance:.1%}): a model may learn "
                "this instead of the crystal's shape, and test metrics will not show it.")
    return (f"metadata alone predicts the class with {accuracy:.1%} accuracy "
            f"(chance {chance:.1%}): no strong shortcut")
