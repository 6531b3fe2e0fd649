"""Measure the rejection of foreign images: AUROC, FPR at 95 % TPR and rejection rates per folder.

The model's own fitted score and threshold are used through :class:`Predictor` (either back
end), so the figures are what ``predict`` does. In-distribution images (e.g. ``SPLIT/test``)
are the negatives, each foreign folder in turn the positives.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from crystalscope.data.ood_sets import set_folders
from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.ood import OODDetector, auroc, fpr_at_tpr
from crystalscope.inference.predictor import Predictor, collect_images
from crystalscope.io import write_json, write_text
from crystalscope.safety import check_output, report_folder

REPORT_NAMES = ("ood_eval.json", "ood_eval.md")
COMMAND = "ood-eval"  # named in the report's manifest: a rerun replaces only what an ood-eval wrote


def _scores(predictor: Predictor, folder: Path, batch_size: int) -> tuple[np.ndarray, int]:
    """OOD scores of every readable image under ``folder`` and the number of unreadable files."""
    predictions = predictor.predict(collect_images([folder]), batch_size=batch_size)
    scores = np.array([p.ood_score for p in predictions if p.classified], dtype=np.float64)
    if not len(scores):  # a rate over no image would be reported as a measurement
        first = next((f" (first: {p.path}: {p.status})" for p in predictions if not p.classified), "")
        raise CrystalscopeError(f"{folder}: none of its {len(predictions)} files could be read as an image{first}")
    return scores, sum(not p.classified for p in predictions)


def _expand(out_dirs: Sequence[str | os.PathLike]) -> list[tuple[str, Path, str]]:
    """(name, folder, kind) per foreign set: a ``synth-ood`` output expands into its sets."""
    found = []
    for given in out_dirs:
        folder = Path(given)
        if not folder.is_dir():
            raise CrystalscopeError(f"{folder}: not a folder of foreign images")
        sets = set_folders(folder)
        if sets:
            found += [(name, path, kind) for name, (path, kind) in sets.items()]
        else:
            found.append((folder.name or str(folder), folder, "-"))
    return found


@dataclass
class InDistribution:
    """The in-distribution folder: images scored, unreadable files, share rejected (None: no image)."""

    folder: str
    n_images: int
    n_unreadable: int
    rejection_rate: float | None


@dataclass
class ForeignSet:
    """One folder of foreign images against the in-distribution ones (AUROC: 1 = perfectly apart)."""

    name: str
    kind: str
    folder: str
    n_images: int
    n_unreadable: int
    auroc: float | None
    fpr_at_95_tpr: float | None
    rejection_rate: float | None


@dataclass
class OODEvaluation:
    """What ``ood-eval`` measured; :meth:`to_dict` is ``ood_eval.json``."""

    model: str
    backend: str
    method: str
    threshold: float
    in_distribution: InDistribution
    sets: list[ForeignSet] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_ood(model_path: str | os.PathLike, in_dir: str | os.PathLike, out_dirs: Sequence[str | os.PathLike],
                 report_dir: str | os.PathLike | None = None, batch_size: int = 32,
                 device: str = "auto") -> OODEvaluation:
    """Score in-distribution and foreign folders with a model's fitted rejection.

    Args:
        model_path: a ``.ckpt`` or ``.onnx`` trained with rejection (``--reject-fpr`` > 0).
        in_dir: in-distribution images (any layout, searched recursively).
        out_dirs: folders of foreign images; a ``synth-ood`` output counts as its sets.
        report_dir: when given, ``ood_eval.json`` and ``ood_eval.md`` are written there.

    Raises:
        CrystalscopeError: the model has no fitted rejection, or a folder is missing or empty.

    Example:
        >>> r = evaluate_ood("run/model.onnx", "split/test", ["ood/"])  # doctest: +SKIP
        >>> r.sets[0].auroc  # doctest: +SKIP
        0.9998
    """
    inputs = [model_path, in_dir, *out_dirs]
    if report_dir is not None:  # refused before the work: never onto a model or image folder, nor a user's
        check_output(report_dir, inputs=inputs, kind="folder", force=True, command=COMMAND, option="--report")
    predictor = Predictor.load(model_path, device=device)
    if predictor.rejection is None:
        raise CrystalscopeError(f"{model_path}: this model has no fitted rejection of foreign images; "
                                "train it with --reject-fpr above 0 (default 0.01)")
    threshold = predictor.rejection.threshold
    in_scores, in_bad = _scores(predictor, Path(in_dir), batch_size)
    result = OODEvaluation(model=str(model_path), backend=predictor.backend_name, method=predictor.rejection.method,
                           threshold=threshold, in_distribution=InDistribution(
                               folder=str(in_dir), n_images=int(len(in_scores)), n_unreadable=in_bad,
                               rejection_rate=_rate(in_scores, predictor.rejection)))
    for name, folder, kind in _expand(out_dirs):
        scores, bad = _scores(predictor, folder, batch_size)
        result.sets.append(ForeignSet(name=name, kind=kind, folder=str(folder), n_images=int(len(scores)),
                                      n_unreadable=bad, auroc=auroc(in_scores, scores),
                                      fpr_at_95_tpr=fpr_at_tpr(in_scores, scores, 0.95),
                                      rejection_rate=_rate(scores, predictor.rejection)))
    if report_dir is not None:  # a rerun replaces its own earlier report (the manifest says which)
        with report_folder(report_dir, inputs=inputs, command=COMMAND, force=True, option="--report") as staging:
            write_json(staging / REPORT_NAMES[0], result.to_dict())
            write_text(staging / REPORT_NAMES[1], ood_markdown(result))
    return result


def _rate(scores: np.ndarray, rejection: OODDetector) -> float | None:
    """Share of ``scores`` the rejection rejects, by its own rule (None for no images)."""
    return float(np.mean(rejection.rejected(scores))) if len(scores) else None


def ood_markdown(result: OODEvaluation) -> str:
    """The result as a markdown table (one row per foreign set)."""
    ind = result.in_distribution
    lines = [f"Model `{result.model}` ({result.backend}), {result.method} score, threshold "
             f"{result.threshold:.4g}; in-distribution `{ind.folder}`: {ind.n_images} images, "
             f"{_pct(ind.rejection_rate)} rejected", "",
             "| set | kind | images | AUROC | FPR at 95 % TPR | rejected |", "|---|---|---:|---:|---:|---:|"]
    for s in result.sets:
        lines.append(f"| {s.name} | {s.kind} | {s.n_images} | {_num(s.auroc)} | "
                     f"{_pct(s.fpr_at_95_tpr)} | {_pct(s.rejection_rate)} |")
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.4f}"


def _pct(value) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.1%}"
