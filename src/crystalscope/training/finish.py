"""After the last epoch: best weights -> temperature on val -> rejection -> test report, plots, ONNX.

Precision policy: the numbers a run reports (the temperature fit, the test report, the
rejection fit) are computed in fp32, whatever ``precision`` the training steps used (bf16
autocast is for the training steps and the per-epoch validation only). Without feature caching
the logits come from :class:`crystalscope.inference.predictor.Predictor` on the best
checkpoint, the forward that ``evaluate`` and ``predict`` run. With feature caching the
head (or the trainable tail + head) runs on the cached features of the frozen part, in fp32:
the frozen part's output is what the checkpoint's backbone computes (checked numerically when
ONNX Runtime runs it), and running the whole backbone again over val and test would add
minutes on a CPU.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from crystalscope.config import TrainConfig
from crystalscope.formats import METRICS_PLOT_FILE, ONNX_FILE
from crystalscope.models.checkpoint import load_checkpoint, save_checkpoint
from crystalscope.models.factory import CrystalClassifier
from crystalscope.training import distributed, loop
from crystalscope.training.epoch import RunFolder, evaluate_split, read_epochs
from crystalscope.training.setup import Learner, RunData, TrainState, transforms

log = logging.getLogger(__name__)


class FeaturesAndLogits(torch.nn.Module):
    """What ``trained`` computes on cached inputs, returned as ``[penultimate features | logits]``.

    ``loop.evaluate`` collects one output per batch; packing both keeps that one loop for the
    rejection fit. ``trained`` is the head (cached backbone features) or the trainable backbone
    tail followed by the head (cached frozen maps); without caching :class:`Predictor` runs.
    """

    def __init__(self, trained: torch.nn.Module, model: CrystalClassifier):
        super().__init__()
        self.body = torch.nn.Identity() if trained is model.head else torch.nn.Sequential(*list(trained)[:-1])
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head[:-1](self.body(x))
        return torch.cat([features, self.head[-1](features)], dim=1)


def predictor_outputs(predictor, images: torch.Tensor, data: RunData, batch_size: int,
                      device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`Predictor.logits_and_features` of uint8 images ``(N, H, W, 3)``, normalised batch by
    batch, in order: ``(logits (N, C), features (N, D))``."""
    logits, features = [], []
    for rows in loop.batches(images.shape[0], batch_size):
        batch = data.preprocessing.normalize_torch(loop.to_device(images, rows, device))
        batch_logits, batch_features = predictor.logits_and_features(batch)  # takes the tensor where it is
        logits.append(batch_logits)
        features.append(batch_features)
    if not logits:
        return np.zeros((0, len(data.class_names)), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(features)


def split_outputs(cfg: TrainConfig, learner: Learner, state: TrainState, data: RunData, predictor,
                  split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of a whole split by the best model in fp32 (every process's rows, in order) and,
    from the same forward pass, its penultimate features ``(N, D)``: the rejection fit's input,
    so only in a one-process run (None with several).

    ``predictor``: :class:`Predictor` on the best checkpoint (None with feature caching, where
    the trained head or tail runs on the cached inputs).
    """
    world = learner.world
    if cfg.caches_features:
        if world.enabled:
            return evaluate_split(cfg, learner, state, data, split, bf16=False)["logits"], None
        _, eval_tf = transforms(cfg, data, state)
        packed = loop.evaluate(FeaturesAndLogits(learner.trained, learner.model), data.inputs[split], None,
                               transform=eval_tf, batch_size=cfg.optimiser.batch_size, device=learner.device,
                               bf16=False)["logits"]
        n_classes = len(data.class_names)
        return packed[:, -n_classes:], packed[:, :-n_classes]
    logits, features = predictor_outputs(predictor, data.inputs[split], data, cfg.optimiser.batch_size, learner.device)
    if not world.enabled:
        return logits, features
    return distributed.gather_logits(logits, data.shard_index[split], len(data.splits[split]), world), None


def fit_rejection(cfg: TrainConfig, data: RunData, train_features: np.ndarray,
                  val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> tuple[dict, np.ndarray]:
    """Fit the OOD score on the train split and its threshold on val; returns (params, test scores).

    ``val``, ``test``: each split's (logits, features) from :func:`split_outputs`.
    """
    from crystalscope.evaluation.ood import fit_detector

    started = time.perf_counter()
    (val_logits, val_features), (test_logits, test_features) = val, test
    stats = data.image_stats
    # with --feature-passes k the training features are k passes over the same images
    train_stats = np.tile(stats["train"], (len(train_features) // max(len(stats["train"]), 1), 1))
    detector = fit_detector(train_features, data.labels["train"].cpu().numpy(), val_features, val_logits,
                            len(data.class_names), cfg.reject_fpr,
                            train_image_stats=train_stats, val_image_stats=stats["val"])
    log.info(f"rejection: {detector.method} score on {train_features.shape[1]}-d features, threshold "
             f"{detector.threshold:.4g} rejects {detector.val_rejection_rate:.1%} of val "
             f"(target {detector.target_fpr:.1%}); fitted in {time.perf_counter() - started:.1f} s")
    return detector.to_dict(), detector.score(test_features, test_logits, stats["test"])


def fit_run_rejection(cfg: TrainConfig, learner: Learner, state: TrainState, data: RunData, best: dict,
                      predictor, val: tuple, test: tuple) -> dict | None:
    """The rejection of foreign images (into ``best``) with the test split's scores, or None.

    ``val``, ``test``: the report's (logits, features) of those splits, reused rather than run again.
    """
    if cfg.reject_fpr <= 0:
        return None
    if learner.world.enabled:
        # each rank holds only its shard of the images: the fit needs them all (docs/scaling.md)
        log.info("rejection: not fitted in a multi-process run; fit it afterwards on one process "
                 "or train without --nproc (docs/scaling.md)")
        return None
    _, train_features = split_outputs(cfg, learner, state, data, predictor, "train")
    best["ood"], test_scores = fit_rejection(cfg, data, train_features, val, test)
    return {**best["ood"], "scores": test_scores}


def finalize(cfg: TrainConfig, learner: Learner, state: TrainState, data: RunData, folder: RunFolder) -> dict:
    """Best weights -> temperature on val -> test report, plots, ONNX; returns the summary."""
    from crystalscope.evaluation.calibration import fit_temperature
    from crystalscope.evaluation.plots import plot_training_curves
    from crystalscope.evaluation.report import write_test_report
    from crystalscope.inference.predictor import Predictor

    # distributed hook: rank 0 reads best.ckpt and sends it (other machines need not see its disk)
    best = distributed.from_main(lambda: load_checkpoint(folder.best), learner.world)
    learner.model.load_state_dict(best["model_state"])
    predictor = None if cfg.caches_features else Predictor.from_checkpoint(best, device=str(learner.device))
    # one forward pass per split gives the report's logits and the rejection fit's features
    val_out, test_out = (split_outputs(cfg, learner, state, data, predictor, split) for split in ("val", "test"))
    temperature, test_logits = fit_temperature(val_out[0], data.splits["val"].labels), test_out[0]
    if not learner.world.is_main:  # only rank 0 writes the report, plots and ONNX
        return {"run_dir": str(folder.path), "rank": learner.world.rank}
    best["temperature"] = float(temperature)
    rejection = fit_run_rejection(cfg, learner, state, data, best, predictor, val_out, test_out)
    save_checkpoint(best, folder.best)
    test = data.splits["test"]
    result = write_test_report(folder.path, y_true=test.labels, logits=test_logits, class_names=data.class_names,
                               positive_class=data.positive_class, paths=[str(p) for p in test.paths],
                               temperature=temperature, seed=cfg.seed, rejection=rejection,
                               meta={"model": f"{cfg.model.backbone} ({folder.best})", "data": str(test.root),
                                     "best_epoch": int(best["training"]["epoch"])})
    plot_training_curves(folder.metrics, folder.path / METRICS_PLOT_FILE)
    if cfg.onnx:
        from crystalscope.export.onnx import export_checkpoint

        export = export_checkpoint(folder.best, folder.path / ONNX_FILE, check_images=list(test.paths[:8]))
        log.info(f"{ONNX_FILE}: ONNX Runtime matches PyTorch (max |dp| {export['max_abs_diff']:.1e})")
    log.info(f"test: accuracy {result['accuracy']:.4f}, macro F1 {result['macro']['f1']:.4f}, "
             f"{result['n_missed']} of {result['n_images']} missed; temperature {temperature:.3f}")
    log.info(f"results in {folder.path}")
    return {"run_dir": str(folder.path), "best_epoch": int(best["training"]["epoch"]),
            "epochs_run": len(read_epochs(folder.metrics)), "stop_reason": state.stopping.reason,
            "temperature": float(temperature), "test": result}
