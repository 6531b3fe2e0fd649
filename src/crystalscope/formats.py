"""Contracts between modules and with the files crystalscope writes, named once.

Everything a file or another process relies on lives here, at the bottom of the layers, so a
producer and its consumers cannot drift apart: the checkpoint and ONNX metadata formats, the
names of the files in a run folder, the columns of ``metrics.csv`` and the split names. Changing
a value here is a format change: bump the version in the format string.
"""

from __future__ import annotations

# ---- splits -------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")

# ---- checkpoint (.ckpt) -----------------------------------------------------------------------
CHECKPOINT_FORMAT = "crystalscope-checkpoint/1"

# ---- exported model (.onnx) ---------------------------------------------------------------------
# /2: the rejection is inside the graph (outputs ``probabilities``, ``ood_score``, ``accepted``)
ONNX_FORMAT = "crystalscope-onnx/2"
#: every ONNX format this version reads (the one list; a file of any other format is refused).
#: /1 files (rejection computed outside the graph) still predict with --no-reject.
KNOWN_ONNX_FORMATS: tuple[str, ...] = ("crystalscope-onnx/1", ONNX_FORMAT)
ONNX_METADATA_KEY = "crystalscope"  # metadata_props entry holding the JSON description
ONNX_PROBABILITIES_NAME = "probabilities"
ONNX_OOD_SCORE_NAME = "ood_score"
ONNX_ACCEPTED_NAME = "accepted"

# ---- a run folder -----------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.csv"
METRICS_PLOT_FILE = "metrics_plot.png"
WEIGHTS_DIR = "weights"
BEST_CHECKPOINT = "best.ckpt"
LAST_CHECKPOINT = "last.ckpt"
ONNX_FILE = "model.onnx"
# the test report, written by ``train`` at the end and by ``evaluate`` alone
REPORT_FILES = ("test_results.txt", "test_results.json", "confusion_matrix.png", "roc_auc.png",
                "calibration.png", "misclassified.csv", "misclassified.png")
# what ``train`` writes into a run folder (a folder of only these may be replaced with --force)
RUN_FILES = (CONFIG_FILE, ENVIRONMENT_FILE, METRICS_FILE, METRICS_PLOT_FILE, WEIGHTS_DIR, *REPORT_FILES,
             ONNX_FILE)

# ---- the manifest of a folder crystalscope wrote ------------------------------------------------
# Inside every output folder: {"format", "command", "version", "files": {relative path: {"size",
# "sha256"} or {"symlink": target}}}. A folder is ours only if it holds this file and every other
# file in it (nested ones too) is listed with the same size and hash (crystalscope.io.foreign_entry).
MANIFEST_FILE = "crystalscope-manifest.json"
MANIFEST_FORMAT = "crystalscope-manifest/1"

# ---- the provenance of a predictions CSV ---------------------------------------------------------
# Beside every predictions CSV (not on stdout): ``<csv>.json`` with what decides its rows. resume
# and merge compare PREDICTIONS_IDENTITY (and the shard) and refuse to mix.
PREDICTIONS_FORMAT = "crystalscope-predictions/1"
PREDICTIONS_SIDECAR_SUFFIX = ".json"
#: keys that must be equal for rows to belong in one CSV (resume) or one merge
PREDICTIONS_IDENTITY = ("model_sha256", "class_names", "inputs", "recursive", "reject")


def predictions_sidecar(csv_path) -> "Path":
    """``predictions.csv`` -> ``predictions.csv.json``, the provenance file beside it."""
    from pathlib import Path

    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.name + PREDICTIONS_SIDECAR_SUFFIX)


# ---- metrics.csv ------------------------------------------------------------------------------
METRICS_PER_CLASS = ("precision", "recall", "f1")


def metrics_columns(class_names: list[str]) -> list[str]:
    """The header of ``metrics.csv``: one row per epoch, per-class validation scores in the middle.

    Example:
        >>> metrics_columns(["cex", "pg"])[:3]
        ['epoch', 'train_loss', 'train_accuracy']
    """
    per_class = [f"val_{m}_{c}" for c in class_names for m in METRICS_PER_CLASS]
    return (["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1"]
            + per_class + ["val_weighted_f1", "lr", "epoch_time_s"])


def metrics_class_names(columns: list[str]) -> list[str]:
    """The class names a ``metrics.csv`` header was written for (inverse of :func:`metrics_columns`).

    Example:
        >>> metrics_class_names(metrics_columns(["cex", "pg"]))
        ['cex', 'pg']
    """
    prefix = "val_f1_"
    return [c[len(prefix):] for c in columns if c.startswith(prefix)]


# ---- frame-cut crops (``monitor --crops DIR``) and their labels (``label``) -----------------------
# ``monitor --crops DIR`` writes each classified particle's crop, exactly as it was given to the
# model, as ``DIR/<file>`` and one row of CROPS_COLUMNS per crop in ``DIR/crops.csv``
# (``box`` is ``x0 y0 x1 y1`` in frame pixels; ``status`` is the particle's status in particles.csv).
CROPS_FORMAT = "crystalscope-crops/1"
CROPS_CSV = "crops.csv"
CROPS_COLUMNS = ("frame", "time_s", "particle", "box", "predicted", "confidence", "ood_score",
                 "status", "file")
# ``label CROPS_DIR --out DATASET`` copies each labelled crop into ``DATASET/<class>/`` and appends
# one row of LABELS_COLUMNS to ``DATASET/labels.csv`` at once (flushed and fsynced): ``label`` is a
# class name, SKIP_LABEL or NOT_A_CRYSTAL_LABEL (those two copy no file; ``dataset_file`` empty).
LABELS_CSV = "labels.csv"
LABELS_COLUMNS = ("crop_file", "label", "suggested", "confidence", "dataset_file", "labelled_at")
SKIP_LABEL = "skip"
NOT_A_CRYSTAL_LABEL = "not_a_crystal"
