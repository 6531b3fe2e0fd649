"""training/epoch.py: the steps of one epoch (train, evaluate, finite check, metrics.csv row, log, checkpoints)."""

from __future__ import annotations

import csv
import logging
import math

import numpy as np
import pytest
import torch
from tiny_training import tiny_config, tiny_parts, tiny_split

from crystalscope.evaluation.metrics import classification_metrics
from crystalscope.formats import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    METRICS_FILE,
    WEIGHTS_DIR,
    metrics_columns,
)
from crystalscope.models.checkpoint import load_checkpoint, model_from_checkpoint
from crystalscope.training import epoch
from crystalscope.training.distributed import World
from crystalscope.training.epoch import EpochResult, RunFolder, TrainingDiverged


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return tiny_split(tmp_path_factory.mktemp("epoch") / "split")


def _result(number: int, class_names=("cex", "pg"), val_loss: float = 0.5) -> EpochResult:
    labels = np.array([0, 0, 1, 1])
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [0.0, 2.0]])  # one cex called pg
    metrics = classification_metrics(labels, logits, list(class_names))
    return EpochResult(epoch=number, train={"loss": 0.25, "accuracy": 0.75, "samples": 12}, train_seconds=2.0,
                       val={"logits": logits, "loss": val_loss, "accuracy": 0.75}, metrics=metrics, lr=0.05,
                       seconds=3.0)


def test_run_folder_uses_the_contracted_names(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.weights == tmp_path / WEIGHTS_DIR and folder.metrics == tmp_path / METRICS_FILE
    assert folder.best == tmp_path / WEIGHTS_DIR / BEST_CHECKPOINT
    assert folder.last == tmp_path / WEIGHTS_DIR / LAST_CHECKPOINT


def test_steps_per_epoch_counts_partial_batches(split):
    cfg = tiny_config(split, batch_size=5)
    data = epoch.RunData(splits={}, class_names=[], positive_class=None, preprocessing=None,
                         inputs={"train": torch.zeros(12, 1), "val": torch.zeros(6, 1)})
    assert epoch.steps_per_epoch(cfg, data) == 3 + 2


def test_train_epoch_changes_the_trainable_weights_only(split):
    cfg, data, learner, state = tiny_parts(split, trainable_fraction=0.1)
    before = {name: t.detach().clone() for name, t in learner.model.state_dict().items()}
    steps = []
    stats, seconds = epoch.train_epoch(cfg, learner, state, data, 1, on_step=lambda: steps.append(1))
    assert stats["samples"] == 12 and len(steps) == 3 and seconds > 0
    assert math.isfinite(stats["loss"]) and 0.0 <= stats["accuracy"] <= 1.0
    after = learner.model.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    trainable = {name for name, p in learner.model.named_parameters() if p.requires_grad}
    frozen = {name for name, p in learner.model.named_parameters() if not p.requires_grad}
    assert not moved & frozen
    # frozen BatchNorm layers keep their ImageNet statistics (the trainable last block's are updated)
    assert before["backbone.bn1.running_mean"].equal(after["backbone.bn1.running_mean"])
    assert "backbone.layer4.1.bn2.running_mean" in moved
    assert {"head.0.weight", "head.7.weight", "backbone.layer4.1.conv2.weight"} <= moved & trainable


def test_evaluate_split_returns_logits_in_order_and_the_loss(split):
    cfg, data, learner, state = tiny_parts(split)
    out = epoch.evaluate_split(cfg, learner, state, data, "val")
    assert out["logits"].shape == (6, 2) and out["logits"].dtype == np.float32
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(out["logits"]), data.labels["val"])
    assert out["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert out["accuracy"] == pytest.approx(float((out["logits"].argmax(1) == data.labels["val"].numpy()).mean()))
    again = epoch.evaluate_split(cfg, learner, state, data, "val")  # eval mode: no dropout, no augmentation
    assert np.array_equal(out["logits"], again["logits"])


def test_check_finite_lets_finite_losses_pass_and_stops_a_diverged_run(split, tmp_path):
    cfg, folder = tiny_config(split), RunFolder(tmp_path)
    epoch.check_finite(cfg, folder, 3, 0.7, 0.6)
    with pytest.raises(TrainingDiverged, match=r"^training diverged in epoch 3: the training loss is nan; lower "
                                               r"--lr \(now 0.05\) or raise --batch-size \(now 4\); .*last.ckpt "
                                               r"keeps epoch 2$") as caught:
        epoch.check_finite(cfg, folder, 3, float("nan"), 0.6)
    assert caught.value.exit_code == 1
    with pytest.raises(TrainingDiverged, match="in epoch 1: the val loss is inf; .*; no checkpoint was saved$"):
        epoch.check_finite(cfg, folder, 1, 0.7, float("inf"))


def test_metrics_row_has_exactly_the_contracted_columns():
    row = epoch.metrics_row(_result(2, class_names=("cex", "pg")))
    assert list(row) == metrics_columns(["cex", "pg"])
    assert row["epoch"] == 2 and row["val_loss"] == "0.500000" and row["lr"] == "0.05"
    assert row["val_recall_cex"] == "0.500000" and row["val_precision_pg"] == f"{2 / 3:.6f}"
    assert row["epoch_time_s"] == "3.000"


def test_write_metrics_row_keeps_earlier_epochs_and_drops_later_ones(tmp_path):
    path, columns = tmp_path / "metrics.csv", metrics_columns(["cex", "pg"])
    assert epoch.read_epochs(path) == []
    for number in (1, 2, 3):
        epoch.write_metrics_row(path, columns, epoch.metrics_row(_result(number)), number - 1)
    assert epoch.read_epochs(path) == [1, 2, 3]
    # a resumed run from epoch 1 rewrites epoch 2 and forgets the interrupted run's epoch 3
    epoch.write_metrics_row(path, columns, epoch.metrics_row(_result(2, val_loss=0.1)), 1)
    rows = list(csv.DictReader(path.open()))
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[1]["val_loss"] == "0.100000"
    assert path.read_text().splitlines()[0] == ",".join(columns)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left


def test_log_epoch_writes_the_row_and_logs_the_line(split, tmp_path, caplog):
    cfg, folder = tiny_config(split), RunFolder(tmp_path)
    data = epoch.RunData(splits={}, class_names=["cex", "pg"], positive_class="pg", preprocessing=None)
    with caplog.at_level(logging.INFO, logger="crystalscope"):
        row = epoch.log_epoch(cfg, folder, data, _result(1), World(), improved=True)
    assert epoch.read_epochs(folder.metrics) == [1] and row["epoch"] == 1
    assert caplog.messages[0].startswith("Epoch 1/2 - 3.0 s (training 6 img/s) - loss: 0.2500")
    assert caplog.messages[0].endswith("(best)")
    assert [m.split(" - ")[0].strip() for m in caplog.messages[1:]] == ["cex", "pg"]
    caplog.clear()
    other = RunFolder(tmp_path / "rank1")
    epoch.log_epoch(cfg, other, data, _result(1), World(rank=1, size=2), improved=False)
    assert not other.metrics.exists() and caplog.messages == []  # only rank 0 writes and talks


def test_save_checkpoints_writes_last_always_and_best_when_improved(split, tmp_path):
    cfg, data, learner, state = tiny_parts(split)
    folder = RunFolder(tmp_path)
    folder.weights.mkdir()
    state.epoch = 1
    epoch.save_checkpoints(cfg, learner, state, data, folder, {"train": "sha256:t"}, improved=False)
    assert folder.last.is_file() and not folder.best.exists()
    state.epoch = 2
    epoch.save_checkpoints(cfg, learner, state, data, folder, {"train": "sha256:t"}, improved=True)
    assert folder.best.read_bytes() == folder.last.read_bytes()  # one checkpoint, serialised once
    best, last = load_checkpoint(folder.best), load_checkpoint(folder.last)
    assert best["training"]["epoch"] == last["training"]["epoch"] == 2
    assert best["training"]["data_sha256"] == {"train": "sha256:t"}
    assert best["training"]["config"]["backbone"] == "resnet18" and best["class_names"] == ["cex", "pg"]
    x = data.preprocessing.normalize_torch(data.inputs["val"])
    learner.model.eval()
    with torch.no_grad():
        assert torch.allclose(model_from_checkpoint(best)(x), learner.model(x), atol=1e-6)


def test_save_checkpoints_is_a_no_op_on_other_ranks(split, tmp_path):
    import dataclasses

    cfg, data, learner, state = tiny_parts(split)
    other = dataclasses.replace(learner, world=World(rank=1, size=2))
    folder = RunFolder(tmp_path)
    epoch.save_checkpoints(cfg, other, state, data, folder, {}, improved=True)
    assert not folder.weights.exists()
