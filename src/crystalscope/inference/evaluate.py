"""Evaluate a saved model on any folder of class folders: the test report ``train`` writes.

``crystalscope evaluate CHECKPOINT FOLDER`` runs :func:`evaluate_checkpoint`: the images are
decoded and resized once by the model's own preprocessing, then labelled by the checkpoint's
:class:`~crystalscope.inference.predictor.Predictor` (fp32, the forward ``predict`` runs), and
:func:`crystalscope.evaluation.report.write_test_report` turns labels and logits into the
report files (:data:`crystalscope.formats.REPORT_FILES`), written into a folder that appears
under its name only when complete.

A model is scored on the images it was trained or calibrated on only by mistake:
:func:`training_data_warning` compares the folder's content hash (:func:`data_hash`) with the
split hashes the checkpoint carries.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from crystalscope.data.dataset import ImageFolder, data_hash, decode_images, index_folder
from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.report import write_test_report
from crystalscope.inference.predictor import Predictor
from crystalscope.runtime import default_workers
from crystalscope.safety import check_output, next_run_dir, report_folder

log = logging.getLogger(__name__)

COMMAND = "evaluate"  # named in the report's manifest: --force replaces only what an evaluate wrote


def evaluate_checkpoint(ckpt_path: str | Path, data_dir: str | Path, out_dir: str | Path | None = None, *,
                        batch_size: int = 64, device: str = "auto", workers: int | None = None,
                        progress: bool = True, force: bool = False) -> dict:
    """Write the test report of a saved model on a folder of class folders.

    Args:
        ckpt_path: a checkpoint written by ``train``.
        data_dir: one sub-folder of images per class, named as the model's classes.
        out_dir: the report folder (default ``runs/evaluate``, ``runs/evaluate2``, ...).
        batch_size: images per forward pass; ``device``: ``auto``, ``cpu`` or ``cuda``.
        workers: image decoding threads (default: :func:`crystalscope.runtime.default_workers`).
        progress: show the decoding progress bar; ``force``: replace an earlier report.

    Returns:
        The dict written to ``test_results.json`` (``meta["warning"]`` when the folder holds
        the model's own train or val images).

    Raises:
        CrystalscopeError: unreadable checkpoint, or class folders that are not the model's classes.

    Example:
        >>> r = evaluate_checkpoint("runs/train/weights/best.ckpt", "split/test", "runs/eval")  # doctest: +SKIP
        >>> r["macro"]["f1"]  # doctest: +SKIP
        0.9591
    """
    from crystalscope.models.checkpoint import load_checkpoint

    if int(batch_size) < 1:
        raise CrystalscopeError(f"--batch-size {batch_size} must be at least 1")
    out_dir = Path(out_dir) if out_dir else next_run_dir(name="evaluate")
    check_output(out_dir, inputs=[ckpt_path, data_dir], kind="folder", force=force, command=COMMAND)
    ckpt = load_checkpoint(ckpt_path)
    folder = index_folder(data_dir, class_names=list(ckpt["class_names"]))
    meta = {"model": f"{ckpt['backbone']} ({ckpt_path})", "data": str(folder.root)}
    warning = training_data_warning(ckpt, folder)
    if warning:
        meta["warning"] = warning  # the CLI shows it; the report's header keeps it
    predictor = Predictor.from_checkpoint(ckpt, device=device)
    logits, scores = folder_logits(predictor, folder.paths, batch_size, workers=workers, progress=progress)
    # with a fitted rejection the report also gives the folder's rejection rate
    rejection = None if scores is None else {**ckpt["ood"], "scores": scores}
    # the report folder appears under its final name only when complete (a full disk leaves nothing)
    with report_folder(out_dir, inputs=[ckpt_path, data_dir], command=COMMAND, force=force) as staging:
        return write_test_report(staging, y_true=folder.labels, logits=logits, class_names=predictor.class_names,
                                 positive_class=ckpt.get("positive_class"), paths=[str(p) for p in folder.paths],
                                 temperature=predictor.temperature,
                                 seed=int(ckpt.get("training", {}).get("seed", 0)), rejection=rejection, meta=meta)


def folder_logits(predictor: Predictor, paths: Sequence[str | os.PathLike], batch_size: int = 64, *,
                  workers: int | None = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits ``(N, C)`` and OOD scores ``(N,)`` (None without rejection) of image files, in order.

    Every file must be readable (a test set with a broken file is an error naming it, not a
    row): the images are decoded once by :func:`crystalscope.data.dataset.decode_images`, then
    run through :meth:`Predictor.logits_and_scores`, the forward of ``predict``.

    Example:
        >>> logits, scores = folder_logits(Predictor.load("best.ckpt"), ["CEX (1).png"])  # doctest: +SKIP
        >>> logits.shape, scores  # doctest: +SKIP
        ((1, 2), None)
    """
    images = decode_images([Path(p) for p in paths], predictor.preprocessing, workers=default_workers(workers),
                           progress=progress)
    parts = [predictor.logits_and_scores(images[start:start + batch_size])
             for start in range(0, len(images), batch_size)]
    logits = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, len(predictor.class_names)), np.float32)
    if predictor.rejection is None:
        return logits, None
    return logits, np.concatenate([p[1] for p in parts]) if parts else np.zeros(0)


def training_data_warning(ckpt: dict, folder: ImageFolder) -> str | None:
    """A warning when ``folder`` holds exactly the images of the model's train or val split.

    Example:
        >>> training_data_warning(load_checkpoint("best.ckpt"), index_folder("split/train"))  # doctest: +SKIP
        'split/train holds the very images the model was trained on (its train split): ...'
    """
    hashes = ckpt.get("training", {}).get("data_sha256") or {}
    seen = {h: name for name, h in hashes.items() if name in ("train", "val")}
    if not seen:
        return None
    name = seen.get(data_hash(folder.root, folder.paths))
    if name is None:
        return None
    what = "trained on" if name == "train" else "selected and calibrated on"
    return (f"{folder.root} holds the very images the model was {what} (its {name} split): "
            "these scores say nothing about new images; evaluate on the test split")
