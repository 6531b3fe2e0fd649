"""The test report: one call turns labels + logits into every evaluation deliverable.

:func:`write_test_report` writes, atomically, into one folder:

- ``test_results.txt``: header, scikit-learn classification report (4 decimals, real class
  names), accuracy, confusion matrix, ROC AUC, images missed, bootstrap 95 % intervals, ECE
  before/after temperature scaling;
- ``test_results.json``: the same numbers, machine-readable;
- ``confusion_matrix.png``, ``roc_auc.png``, ``calibration.png``;
- ``misclassified.csv``: ``path,true,predicted,confidence`` with class names;
- ``misclassified.png``: a contact sheet of those images, most confident mistakes first.

Label index ``i`` is ``class_names[i]`` everywhere. (The reference study passed
``target_names=['PG', 'CEX']`` while index 0 was its CEX folder, so every row was misnamed.)
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.calibration import (expected_calibration_error, reliability_bins,
                                                 softmax)
from crystalscope.evaluation.metrics import (bootstrap_intervals, check_predictions,
                                             classification_metrics, confusion_matrix,
                                             format_class_lines)
from crystalscope.evaluation.sheets import misclassified_sheet
# the report's file names are a run-folder contract (crystalscope.formats); importable from here too
from crystalscope.formats import REPORT_FILES  # noqa: F401
from crystalscope.io import write_json, write_text

ECE_BINS = 15


def _finite_or_none(value) -> float | None:
    """JSON has no NaN: undefined numbers become null."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def resolve_positive_class(class_names: list[str], positive_class: str | None) -> str | None:
    """The positive class for binary ROC: as given, else ``pg`` when present, else index 1.

    N-class tasks keep ``None`` (one-vs-rest ROC for every class) unless one is named.

    Example:
        >>> resolve_positive_class(["cex", "pg"], None)
        'pg'
    """
    names = list(class_names)
    if positive_class is not None:
        if positive_class not in names:
            raise CrystalscopeError(
                f"positive class {positive_class!r} is not one of the class names "
                f"({', '.join(names)}): pass one of them"
            )
        return positive_class
    if len(names) == 2:
        return "pg" if "pg" in names else names[1]
    return None


def _roc_one(is_positive: np.ndarray, score: np.ndarray, name: str):
    """(auc, curve, note) for one positive class; undefined when one side is empty."""
    from sklearn.metrics import roc_auc_score, roc_curve

    n_positive = int(is_positive.sum())
    if n_positive == 0 or n_positive == is_positive.size:
        side = "no" if n_positive == 0 else "only"
        return None, None, f"ROC AUC undefined for {name}: the test set has {side} {name} images"
    auc = float(roc_auc_score(is_positive, score))
    fpr, tpr, _ = roc_curve(is_positive, score)
    return auc, (fpr, tpr, auc), None


def roc_summary(y_true: np.ndarray, probs: np.ndarray, class_names: list[str],
                positive_class: str | None) -> dict:
    """ROC AUC: the positive class's for binary tasks, one-vs-rest per class + macro otherwise.

    Returns:
        ``{"roc_auc": float | None | {name: float | None, "macro": float | None},
        "note": str | None, "curves": {name: (fpr, tpr, auc) | None}}``. The macro AUC averages
        the classes where ROC is defined; the note says which were left out.

    Example:
        >>> s = roc_summary(np.array([0, 1]), np.array([[.8, .2], [.3, .7]]), ["cex", "pg"], "pg")
        >>> s["roc_auc"]
        1.0
    """
    names = list(class_names)
    if len(names) == 2:
        index = names.index(positive_class)
        auc, curve, note = _roc_one(y_true == index, probs[:, index], positive_class)
        return {"roc_auc": auc, "note": note, "curves": {positive_class: curve}}
    per_class, curves, notes = {}, {}, []
    for index, name in enumerate(names):
        per_class[name], curves[name], note = _roc_one(y_true == index, probs[:, index], name)
        if note:
            notes.append(note)
    defined = [v for v in per_class.values() if v is not None]
    per_class["macro"] = float(np.mean(defined)) if defined else None
    if notes:
        notes.append("macro AUC averages the classes where ROC is defined"
                     if defined else "macro AUC undefined")
    return {"roc_auc": per_class, "note": "; ".join(notes) or None, "curves": curves}


def _check_report_inputs(y_true, logits, class_names, paths, temperature, n_bootstrap):
    y_true, logits = check_predictions(y_true, logits, class_names)
    if y_true.size == 0:
        raise CrystalscopeError("the test set is empty: no images to evaluate")
    if not np.all(np.isfinite(logits)):
        raise CrystalscopeError(
            "the model's outputs contain NaN or infinity (did training diverge? try a lower "
            "learning rate)"
        )
    paths = [f"#{i}" for i in range(y_true.size)] if paths is None else [str(p) for p in paths]
    if len(paths) != y_true.size:
        raise CrystalscopeError(
            f"got {len(paths)} image paths for {y_true.size} labels: they must match one per image"
        )
    try:
        valid_temperature = math.isfinite(float(temperature)) and float(temperature) > 0
    except (TypeError, ValueError):
        valid_temperature = False
    if not valid_temperature:
        raise CrystalscopeError(f"temperature must be a positive number, got {temperature!r}")
    if int(n_bootstrap) < 1:
        raise CrystalscopeError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    return y_true, logits, paths


def _misclassified_csv(paths, y_true, y_pred, probs, class_names) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "true", "predicted", "confidence"])
    for i in np.flatnonzero(y_true != y_pred):
        writer.writerow([paths[i], class_names[y_true[i]], class_names[y_pred[i]],
                         f"{probs[i, y_pred[i]]:.6f}"])
    return buffer.getvalue()


def _confusion_table(cm: np.ndarray, class_names: list[str]) -> list[str]:
    row_labels = [f"true {n}" for n in class_names]
    col_labels = [f"pred {n}" for n in class_names]
    first = max(len(s) for s in row_labels)
    width = max(max(len(s) for s in col_labels), len(str(int(cm.max(initial=0)))))
    lines = [" " * first + "  " + "  ".join(c.rjust(width) for c in col_labels)]
    for label, row in zip(row_labels, cm):
        lines.append(label.ljust(first) + "  " + "  ".join(str(int(v)).rjust(width) for v in row))
    return lines


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_ci(interval) -> str:
    return "n/a" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def _roc_lines(result: dict) -> list[str]:
    auc = result["roc_auc"]
    if isinstance(auc, dict):
        lines = ["ROC AUC (one-vs-rest):"]
        lines += [f"  {name}: {_fmt(value)}" for name, value in auc.items()]
    else:
        lines = [f"ROC AUC (positive class {result['positive_class']}): {_fmt(auc)}"]
    if result["roc_auc_note"]:
        lines.append(f"  note: {result['roc_auc_note']}")
    return lines


def _report_text(result: dict, sklearn_report: str) -> str:
    names = result["class_names"]
    boot = result["bootstrap"]
    lines = ["crystalscope test report", "=" * 24]
    lines += [f"{key}: {value}" for key, value in (result.get("meta") or {}).items()]
    lines += [f"classes (index order): {', '.join(names)}",
              f"positive class: {result['positive_class']}",
              f"test images: {result['n_images']}",
              f"temperature: {result['temperature']:.4f} (probabilities = softmax(logits / T))",
              "", "Classification report", sklearn_report.rstrip(), "",
              *format_class_lines(result), "",
              f"Accuracy: {result['accuracy']:.4f}  95% CI {_fmt_ci(result['accuracy_ci95'])}",
              f"Test images missed: {result['n_missed']} of {result['n_images']}", "",
              "Confusion matrix (rows = true class, columns = predicted class)",
              *_confusion_table(np.array(result["confusion_matrix"]), names), "",
              *_roc_lines(result), "",
              f"Bootstrap 95% confidence intervals ({boot['method']}, {boot['n_resamples']} "
              f"resamples of the test images, seed {boot['seed']})",
              f"  accuracy: {result['accuracy']:.4f} {_fmt_ci(result['accuracy_ci95'])}"]
    lines += [f"  F1 {name}: {scores['f1']:.4f} {_fmt_ci(scores['f1_ci95'])}"
              for name, scores in result["per_class"].items()]
    lines += [f"  macro F1: {result['macro']['f1']:.4f} {_fmt_ci(result['macro_f1_ci95'])}", "",
              f"Calibration (expected calibration error, {result['ece_bins']} bins)",
              f"  ECE before temperature scaling (T = 1): {result['ece_uncalibrated']:.4f}",
              f"  ECE after temperature scaling (T = {result['temperature']:.4f}): "
              f"{result['ece']:.4f}", ""]
    lines += _rejection_lines(result)
    return "\n".join(lines)


def _rejection_summary(rejection: dict | None, n_images: int) -> dict | None:
    """Test rejection rate from the test scores and the fitted threshold (None: no rejection fitted)."""
    if rejection is None:
        return None
    scores = np.asarray(rejection["scores"], dtype=np.float64)
    if scores.shape != (n_images,):
        raise CrystalscopeError(f"rejection: {scores.shape[0]} scores for {n_images} test images")
    threshold = float(rejection["threshold"])
    n_rejected = int(np.sum(scores > threshold))
    return {"method": rejection.get("method"), "threshold": threshold, "target_fpr": rejection.get("target_fpr"),
            "val_rejection_rate": rejection.get("val_rejection_rate"), "n_rejected": n_rejected,
            "test_rejection_rate": n_rejected / max(n_images, 1)}


def _rejection_lines(result: dict) -> list[str]:
    rejection = result.get("rejection")
    if not rejection:
        return ["Rejection of foreign images: not fitted for this model", ""]
    return [f"Rejection of foreign images ({rejection['method']} score, threshold {rejection['threshold']:.4g}, "
            f"target {_fmt(rejection['target_fpr'])} of val)",
            f"  test images rejected: {rejection['n_rejected']} of {result['n_images']} "
            f"({rejection['test_rejection_rate']:.2%}); val: {_fmt(rejection['val_rejection_rate'])}", ""]


def _build_result(y_true, logits, probs, class_names, positive_class, roc, temperature,
                  n_bootstrap, seed, meta) -> dict:
    n_classes = len(class_names)
    y_pred = probs.argmax(axis=1)
    metrics = classification_metrics(y_true, probs, class_names)
    intervals = bootstrap_intervals(y_true, y_pred, n_classes, n_bootstrap=n_bootstrap, seed=seed)
    for index, scores in enumerate(metrics["per_class"].values()):
        scores["f1_ci95"] = intervals["f1"][index]
    return {"meta": dict(meta) if meta else {}, "class_names": list(class_names),
              "positive_class": positive_class, "n_images": int(y_true.size),
              "n_missed": int(np.sum(y_true != y_pred)),
              "accuracy": metrics["accuracy"], "accuracy_ci95": intervals["accuracy"],
              "per_class": metrics["per_class"], "macro": metrics["macro"],
              "weighted": metrics["weighted"], "macro_f1_ci95": intervals["macro_f1"],
              "confusion_matrix": confusion_matrix(y_true, y_pred, n_classes).tolist(),
              "roc_auc": roc["roc_auc"], "roc_auc_note": roc["note"],
              "ece": expected_calibration_error(probs, y_true, ECE_BINS),
              "ece_uncalibrated": expected_calibration_error(softmax(logits), y_true, ECE_BINS),
              "ece_bins": ECE_BINS, "temperature": float(temperature),
              "bootstrap": {"method": "percentile", "confidence": 0.95,
                            "n_resamples": int(n_bootstrap), "seed": int(seed)}}


def write_test_report(out_dir, *, y_true, logits, class_names, positive_class, paths,
                      temperature: float = 1.0, n_bootstrap: int = 1000, seed: int = 0,
                      meta: dict | None = None, rejection: dict | None = None) -> dict:
    """Write the full test report (txt, json, four PNGs, misclassified.csv) into ``out_dir``.

    Args:
        out_dir: folder to write into (created if needed); each file is written atomically.
        y_true: true class indices, shape (N,).
        logits: raw model outputs, shape (N, C); probabilities = softmax(logits / temperature).
        class_names: C names, index ``i`` = ``class_names[i]``.
        positive_class: class whose ROC is reported in binary tasks (``None``: ``pg`` when
            present, else index 1); optional for N classes.
        paths: the N image paths (``None``: ``#index``), for ``misclassified.csv``.
        temperature: calibration temperature fitted on the validation split.
        n_bootstrap: bootstrap resamples for the 95 % intervals.
        seed: bootstrap seed (the same seed gives the same intervals).
        meta: optional header lines for the txt report (model, run, data), stored in the json.
        rejection: the model's fitted rejection (``OODDetector.to_dict()``) plus ``scores``, the
            N test images' OOD scores; the report then gives the test split's rejection rate.
            The class metrics are over all test images, rejected or not.

    Returns:
        The dict written to ``test_results.json``.

    Raises:
        CrystalscopeError: mismatched lengths, unknown positive class, bad temperature, no images.

    Example:
        >>> write_test_report("runs/a", y_true=y, logits=z, class_names=["cex", "pg"],
        ...                   positive_class="pg", paths=files, temperature=1.3)  # doctest: +SKIP
    """
    names = list(class_names)
    y_true, logits, paths = _check_report_inputs(y_true, logits, names, paths, temperature,
                                                 n_bootstrap)
    positive_class = resolve_positive_class(names, positive_class)
    probs = softmax(logits, float(temperature))
    roc = roc_summary(y_true, probs, names, positive_class)
    result = _build_result(y_true, logits, probs, names, positive_class, roc, temperature,
                           n_bootstrap, seed, meta)
    result["rejection"] = _rejection_summary(rejection, len(y_true))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_plots(out_dir, result, roc, logits, probs, y_true)
    _write_misclassified(out_dir, paths, y_true, probs, names)
    write_text(out_dir / "test_results.txt", _report_text(result, _sklearn_report(y_true, probs, names)))
    write_json(out_dir / "test_results.json", _strict_json(result))
    return _strict_json(result)


def _sklearn_report(y_true: np.ndarray, probs: np.ndarray, names: list[str]) -> str:
    """scikit-learn's classification report with the real class names, 4 decimals."""
    from sklearn.metrics import classification_report

    return classification_report(y_true, probs.argmax(axis=1), labels=list(range(len(names))),
                                 target_names=names, digits=4, zero_division=0)


def _write_plots(out_dir: Path, result: dict, roc: dict, logits: np.ndarray, probs: np.ndarray,
                 y_true: np.ndarray) -> None:
    """confusion_matrix.png, roc_auc.png and calibration.png (before/after temperature scaling)."""
    from crystalscope.evaluation import plots

    names, temperature = result["class_names"], result["temperature"]
    plots.plot_confusion_matrix(np.array(result["confusion_matrix"]), names, out_dir / "confusion_matrix.png")
    if len(names) == 2:
        roc_title = f"ROC, positive class {result['positive_class']}"
    else:
        roc_title = f"ROC, one-vs-rest per class (macro AUC {_fmt(roc['roc_auc']['macro'])})"
    plots.plot_roc(roc["curves"], out_dir / "roc_auc.png", title=roc_title)
    plots.plot_reliability(
        [("Before temperature scaling (T = 1)", reliability_bins(softmax(logits), y_true, ECE_BINS),
          result["ece_uncalibrated"]),
         (f"After temperature scaling (T = {temperature:.3f})", reliability_bins(probs, y_true, ECE_BINS),
          result["ece"])],
        out_dir / "calibration.png")


def _write_misclassified(out_dir: Path, paths: list[str], y_true: np.ndarray, probs: np.ndarray,
                         names: list[str]) -> None:
    """misclassified.csv and its contact sheet misclassified.png, most confident mistakes first."""
    y_pred = probs.argmax(axis=1)
    write_text(out_dir / "misclassified.csv", _misclassified_csv(paths, y_true, y_pred, probs, names))
    wrong = np.flatnonzero(y_true != y_pred)
    misclassified_sheet([paths[i] for i in wrong], [names[y_true[i]] for i in wrong],
                        [names[y_pred[i]] for i in wrong], [probs[i, y_pred[i]] for i in wrong],
                        out_dir / "misclassified.png", n_images=int(y_true.size))


def _strict_json(value):
    """Copy of ``value`` with NaN/inf replaced by None and numpy scalars made native."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _finite_or_none(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)  # paths and other objects in ``meta``
