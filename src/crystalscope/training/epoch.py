"""The steps of one epoch, each one call in :func:`crystalscope.training.run.fit`'s loop.

:func:`train_epoch` (one pass over the shuffled training inputs) -> :func:`evaluate_split`
(the whole val split) -> :func:`log_epoch` (the metrics.csv row and the lines a user sees) ->
the stopping decision (:meth:`StoppingState.update`) -> :func:`save_checkpoints`.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from crystalscope.config import TrainConfig
from crystalscope.errors import CrystalscopeError
from crystalscope.formats import (BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS_FILE, WEIGHTS_DIR,
                                  metrics_columns)
from crystalscope.io import write_text
from crystalscope.models.checkpoint import make_checkpoint, save_checkpoint
from crystalscope.training import distributed, loop
from crystalscope.training.record import rng_states
from crystalscope.training.setup import Learner, RunData, TrainState, transforms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFolder:
    """The run folder's paths (names from :mod:`crystalscope.formats`)."""

    path: Path

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_DIR

    @property
    def best(self) -> Path:
        return self.weights / BEST_CHECKPOINT

    @property
    def last(self) -> Path:
        return self.weights / LAST_CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE


@dataclass(frozen=True)
class EpochResult:
    """What one epoch measured (train and val), as the metrics.csv row reports it."""

    epoch: int
    train: dict  # {"loss", "accuracy", "samples"}
    train_seconds: float
    val: dict  # {"logits", "loss", "accuracy"} over the whole val split
    metrics: dict  # classification_metrics of val
    lr: float
    seconds: float  # training + validation


def steps_per_epoch(cfg: TrainConfig, data: RunData) -> int:
    """Training plus validation batches of one epoch (the progress bar's length)."""
    batch = cfg.optimiser.batch_size
    return -(-data.inputs["train"].shape[0] // batch) + -(-data.inputs["val"].shape[0] // batch)


def train_epoch(cfg: TrainConfig, learner: Learner, state: TrainState, data: RunData, epoch: int,
                on_step: Callable[[], None] | None = None) -> tuple[dict, float]:
    """One pass over the shuffled training inputs; returns (stats of all processes, seconds)."""
    train_tf, _ = transforms(cfg, data, state)
    # distributed hook: each rank's shuffle and augmentation order from (seed, epoch, rank)
    distributed.reseed_epoch([state.shuffle_rng, state.augment_rng], cfg.seed, epoch, learner.world)
    started = time.perf_counter()
    stats = loop.train_one_epoch(learner.forward, data.inputs["train"], data.labels["train"], learner.optimizer,
                                 transform=train_tf, batch_size=cfg.optimiser.batch_size, device=learner.device,
                                 generator=state.shuffle_rng, drop_last=cfg.runtime.compile or cfg.runtime.cuda_graphs,
                                 on_step=on_step, bf16=learner.bf16, step=learner.step)
    seconds = time.perf_counter() - started  # .item() in train_one_epoch already synchronised
    return distributed.reduce_train_stats(stats, learner.world), seconds


def evaluate_split(cfg: TrainConfig, learner: Learner, state: TrainState, data: RunData, split: str,
                   on_step: Callable[[], None] | None = None, bf16: bool | None = None) -> dict:
    """Logits (whole split, in order), loss and accuracy of the trained model on ``split``.

    ``bf16`` defaults to the training steps' precision (the per-epoch validation that picks the
    best epoch runs like training). One process runs ``learner.forward``. With several processes
    each rank evaluates its shard with rank 0's BatchNorm buffers and the rows are gathered:
    every image once, the numbers of a one-process evaluation.
    """
    _, eval_tf = transforms(cfg, data, state)
    bf16 = learner.bf16 if bf16 is None else bf16
    world, batch = learner.world, cfg.optimiser.batch_size
    if not world.enabled:
        return loop.evaluate(learner.forward, data.inputs[split], data.labels[split], transform=eval_tf,
                             batch_size=batch, device=learner.device, on_step=on_step, bf16=bf16)
    distributed.sync_buffers(learner.trained, world)
    # the plain module, not the DDP replica: shards differ in length, and eval needs no gradient sync
    local = loop.evaluate(learner.trained, data.inputs[split], None, transform=eval_tf, batch_size=batch,
                          device=learner.device, on_step=on_step, bf16=bf16)
    logits = distributed.gather_logits(local["logits"], data.shard_index[split], len(data.splits[split]), world)
    scores, labels = torch.from_numpy(logits), torch.from_numpy(data.splits[split].labels).long()
    return {"logits": logits, "loss": float(torch.nn.functional.cross_entropy(scores, labels)),
            "accuracy": float((scores.argmax(1) == labels).float().mean())}


class TrainingDiverged(CrystalscopeError):
    """The loss became NaN or infinite: the run stops, keeping the last good checkpoint."""

    exit_code = 1


def check_finite(cfg: TrainConfig, folder: RunFolder, epoch: int, train_loss: float, val_loss: float) -> None:
    """Stop the run (before this epoch's checkpoints are saved) when a loss is not finite.

    Raises:
        TrainingDiverged: naming the epoch, the learning rate and what was kept.
    """
    if np.isfinite(train_loss) and np.isfinite(val_loss):
        return
    kept = f"{folder.last} keeps epoch {epoch - 1}" if epoch > 1 else "no checkpoint was saved"
    which, loss = ("training", train_loss) if not np.isfinite(train_loss) else ("val", val_loss)
    raise TrainingDiverged(f"training diverged in epoch {epoch}: the {which} loss is {loss}; lower --lr "
                           f"(now {cfg.optimiser.lr:g}) or raise --batch-size (now {cfg.optimiser.batch_size}); {kept}")


def metrics_row(result: EpochResult) -> dict:
    """The metrics.csv row of one epoch (columns: :func:`crystalscope.formats.metrics_columns`)."""
    m, train = result.metrics, result.train
    row = {"epoch": result.epoch, "train_loss": f"{train['loss']:.6f}", "train_accuracy": f"{train['accuracy']:.6f}",
           "val_loss": f"{result.val['loss']:.6f}", "val_accuracy": f"{m['accuracy']:.6f}",
           "val_macro_f1": f"{m['macro']['f1']:.6f}"}
    for name, scores in m["per_class"].items():
        for key in ("precision", "recall", "f1"):
            row[f"val_{key}_{name}"] = f"{scores[key]:.6f}"
    row.update(val_weighted_f1=f"{m['weighted']['f1']:.6f}", lr=f"{result.lr:g}",
               epoch_time_s=f"{result.seconds:.3f}")
    return row


def write_metrics_row(path: Path, columns: list[str], row: dict, keep_until_epoch: int) -> None:
    """Rewrite metrics.csv atomically with the rows of earlier epochs plus ``row``."""
    rows = []
    if path.is_file():
        rows = [r for r in csv.DictReader(io.StringIO(path.read_text())) if int(r["epoch"]) <= keep_until_epoch]
    rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def read_epochs(path: Path) -> list[int]:
    """The epochs metrics.csv holds (empty when there is no file yet)."""
    return [int(r["epoch"]) for r in csv.DictReader(io.StringIO(path.read_text()))] if path.is_file() else []


def log_epoch(cfg: TrainConfig, folder: RunFolder, data: RunData, result: EpochResult, world,
              improved: bool) -> dict:
    """Write the epoch's metrics.csv row (rank 0) and log its line and per-class lines; returns the row.

    ``improved``: this epoch has the lowest val loss so far (the line ends with "(best)").
    """
    from crystalscope.evaluation.metrics import format_class_lines

    row = metrics_row(result)
    if not world.is_main:  # distributed hook: only rank 0 writes and talks
        return row
    write_metrics_row(folder.metrics, metrics_columns(data.class_names), row, result.epoch - 1)
    rate = result.train["samples"] / max(result.train_seconds, 1e-9)
    log.info(f"Epoch {result.epoch}/{cfg.optimiser.epochs} - {result.seconds:.1f} s (training {rate:.0f} img/s) - "
             f"loss: {result.train['loss']:.4f} - accuracy: {result.train['accuracy']:.4f} - "
             f"val_loss: {result.val['loss']:.4f} - val_accuracy: {result.metrics['accuracy']:.4f}"
             + (" (best)" if improved else ""))
    for line in format_class_lines(result.metrics):
        log.info(f"  {line}")
    return row


def checkpoint(cfg: TrainConfig, learner: Learner, state: TrainState, data: RunData, data_hashes: dict,
               temperature: float = 1.0) -> dict:
    """The self-describing checkpoint of the current model, with resumable training state."""
    training = {"epoch": int(state.epoch), "optimizer": learner.optimizer.state_dict(),
                "stopping": state.stopping.to_dict(), "config": cfg.to_dict(), "seed": int(cfg.seed),
                "shuffle_rng": state.shuffle_rng.get_state(), "augment_rng": state.augment_rng.get_state(),
                "weights_source": state.weights_source, "rng": rng_states(),
                "initial_weights_sha256": state.initial_weights, "data_sha256": dict(data_hashes)}
    return make_checkpoint(learner.model, backbone=cfg.model.backbone, head=learner.head,
                           class_names=data.class_names, positive_class=data.positive_class,
                           preprocessing=data.preprocessing, temperature=temperature, training=training)


def save_checkpoints(cfg: TrainConfig, learner: Learner, state: TrainState, data: RunData, folder: RunFolder,
                     data_hashes: dict, improved: bool) -> None:
    """``last.ckpt`` every epoch, ``best.ckpt`` when val loss improved (rank 0 only)."""
    if not learner.world.is_main:
        return
    # best before last: a crash in between leaves last.ckpt at the previous epoch, which --resume redoes
    ckpt = checkpoint(cfg, learner, state, data, data_hashes)
    save_checkpoint(ckpt, *([folder.best] if improved else []), folder.last)
