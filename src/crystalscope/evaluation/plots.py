"""Figures for the run folder: training curves, confusion matrix, ROC, reliability diagram.

Figures are built as ``matplotlib.figure.Figure`` objects with the Agg canvas, never through
``pyplot``: nothing is registered in pyplot's global figure list, so a plot per epoch for
hundreds of epochs cannot leak memory, and no display is needed on a headless server. Every
PNG is written atomically.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from crystalscope.errors import CrystalscopeError
from crystalscope.formats import metrics_class_names, metrics_columns
from crystalscope.figures import new_figure, save_png

# what the training curves draw, per epoch (all of them columns of formats.metrics_columns)
PLOTTED_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def _read_metrics_csv(metrics_csv) -> dict[str, list[float]]:
    """The numeric columns of a ``metrics.csv`` whose header is :func:`crystalscope.formats.metrics_columns`."""
    path = Path(metrics_csv)
    if not path.is_file():
        raise CrystalscopeError(f"{path}: metrics file not found (it is written by `train`)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        # the header names its classes; the columns expected for them are the contract's
        expected = metrics_columns(metrics_class_names(header))
        missing = [c for c in expected if c not in header]
        if missing:
            raise CrystalscopeError(
                f"{path}: not a crystalscope metrics.csv, missing column(s) {', '.join(missing)}"
            )
        rows = list(reader)
    if not rows:
        raise CrystalscopeError(f"{path}: no epochs recorded yet, nothing to plot")
    columns: dict[str, list[float]] = {c: [] for c in PLOTTED_COLUMNS}
    for line_no, row in enumerate(rows, start=2):
        for column in PLOTTED_COLUMNS:
            try:
                columns[column].append(float(row[column]))
            except (TypeError, ValueError):
                raise CrystalscopeError(
                    f"{path}, line {line_no}: {column}={row[column]!r} is not a number"
                ) from None
    return columns


def plot_training_curves(metrics_csv, out_png) -> Path:
    """Draw train vs validation accuracy (left) and loss (right) per epoch from metrics.csv.

    Args:
        metrics_csv: the run's ``metrics.csv`` (columns: :func:`crystalscope.formats.metrics_columns`).
        out_png: where to write the figure (atomically).

    Returns:
        The PNG path.

    Raises:
        CrystalscopeError: file missing, columns missing, no rows, or non-numeric values.

    Example:
        >>> plot_training_curves("runs/a/metrics.csv", "runs/a/metrics_plot.png")  # doctest: +SKIP
    """
    columns = _read_metrics_csv(metrics_csv)
    epochs = columns["epoch"]
    figure = new_figure(10, 4)
    panels = (("accuracy", "Accuracy"), ("loss", "Loss"))
    for position, (metric, title) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 2, position)
        # Markers keep a single-epoch run visible (a line needs two points).
        axes.plot(epochs, columns[f"train_{metric}"], marker="o", label=f"train {metric}")
        axes.plot(epochs, columns[f"val_{metric}"], marker="s", label=f"val {metric}")
        axes.set_title(f"{title} per epoch")
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
        axes.legend()
        if len(epochs) < 12:
            axes.set_xticks(epochs)
    return save_png(figure, out_png)


def plot_confusion_matrix(cm: np.ndarray, class_names: list[str], out_png) -> Path:
    """Confusion matrix with counts and row-normalised percentages, rows = true class.

    Example:
        >>> cm = np.array([[5, 1], [0, 6]])
        >>> plot_confusion_matrix(cm, ["cex", "pg"], "cm.png")  # doctest: +SKIP
    """
    cm = np.asarray(cm)
    row_totals = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_share = np.where(row_totals > 0, cm / np.maximum(row_totals, 1), 0.0)
    size = 2.2 + 1.0 * len(class_names)
    figure = new_figure(size + 1.2, size)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(row_share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=45 if len(class_names) > 3 else 0)
    axes.set_yticks(ticks, labels=class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"Confusion matrix ({int(cm.sum())} images)")
    for true_index in range(cm.shape[0]):
        for pred_index in range(cm.shape[1]):
            share = row_share[true_index, pred_index]
            axes.text(pred_index, true_index,
                      f"{cm[true_index, pred_index]}\n{100 * share:.1f}%",
                      ha="center", va="center", fontsize=10,
                      color="white" if share > 0.5 else "black")
    return save_png(figure, out_png)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float] | None], out_png,
             title: str = "ROC") -> Path:
    """ROC curves, one per entry ``name -> (fpr, tpr, auc)``; ``None`` entries are noted.

    Example:
        >>> plot_roc({"pg": (np.array([0, 1]), np.array([0, 1]), 0.5)}, "roc.png")  # doctest: +SKIP
    """
    figure = new_figure(5.5, 5)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    undefined = []
    for name, curve in curves.items():
        if curve is None:
            undefined.append(name)
            continue
        fpr, tpr, auc = curve
        axes.plot(fpr, tpr, linewidth=2, label=f"{name} (AUC = {auc:.4f})")
    if undefined:
        axes.text(0.5, 0.35, "ROC undefined for " + ", ".join(undefined)
                  + "\n(test set lacks positives or negatives)",
                  ha="center", va="center", transform=axes.transAxes, fontsize=9,
                  bbox={"facecolor": "lightyellow", "edgecolor": "grey"})
    axes.set_xlim(-0.01, 1.01)
    axes.set_ylim(-0.01, 1.01)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=9)
    return save_png(figure, out_png)


def _draw_reliability(axes, bins: dict, ece: float, title: str) -> None:
    edges = bins["edges"]
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    filled = bins["count"] > 0
    axes.bar(centers[filled], bins["accuracy"][filled], width=width * 0.9,
             edgecolor="black", color="tab:blue", alpha=0.75, label="accuracy")
    axes.plot(bins["confidence"][filled], bins["accuracy"][filled], "o", color="tab:red",
              markersize=4, label="mean confidence")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for center, accuracy, count in zip(centers[filled], bins["accuracy"][filled],
                                       bins["count"][filled]):
        axes.text(center, min(accuracy + 0.02, 1.02), str(int(count)), ha="center",
                  va="bottom", fontsize=7, rotation=90)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.12)
    axes.set_xlabel("confidence (probability of the predicted class)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"{title}\nECE = {ece:.4f}")
    axes.legend(loc="upper left", fontsize=8)


def plot_reliability(panels: list[tuple[str, dict, float]], out_png) -> Path:
    """Reliability diagrams side by side: ``(title, reliability_bins(...), ece)`` per panel.

    Bars are the accuracy per confidence bin, labelled with the bin's image count; the dashed
    diagonal is perfect calibration.

    Example:
        >>> from crystalscope.evaluation.calibration import reliability_bins  # doctest: +SKIP
        >>> plot_reliability([("T = 1", reliability_bins(p, y), 0.03)], "cal.png")  # doctest: +SKIP
    """
    figure = new_figure(5.2 * len(panels), 4.8)
    for position, (title, bins, ece) in enumerate(panels, start=1):
        _draw_reliability(figure.add_subplot(1, len(panels), position), bins, ece, title)
    return save_png(figure, out_png)

