"""Stopping rules: F1 threshold with patience, val-loss patience, best epoch by val loss."""

import math

import torch

from crystalscope.training.stopping import StoppingState


def test_f1_threshold_stops_at_first_epoch_with_patience_one():
    s = StoppingState(f1_threshold=0.997, f1_patience=1, patience=10)
    s.update(1, 0.5, [0.99, 0.999])
    assert not s.should_stop  # one class below the threshold
    s.update(2, 0.4, [0.998, 0.9971])
    assert s.should_stop and "F1" in s.reason


def test_f1_patience_needs_consecutive_epochs():
    s = StoppingState(f1_threshold=0.9, f1_patience=2, patience=10)
    s.update(1, 0.5, [0.95, 0.95])
    assert not s.should_stop and s.epochs_above_threshold == 1
    s.update(2, 0.4, [0.85, 0.95])  # streak broken
    assert s.epochs_above_threshold == 0 and not s.should_stop
    s.update(3, 0.3, [0.95, 0.91])
    assert not s.should_stop
    s.update(4, 0.3, [0.95, 0.91])
    assert s.should_stop


def test_val_loss_patience_and_best_epoch():
    s = StoppingState(f1_threshold=1.1, f1_patience=1, patience=2)
    assert s.update(1, 0.50, [0.5, 0.5]) is True
    assert s.update(2, 0.40, [0.5, 0.5]) is True
    assert s.update(3, 0.45, [0.9, 0.9]) is False
    assert not s.should_stop and s.epochs_without_improvement == 1
    assert s.update(4, 0.40, [0.9, 0.9]) is False  # equal is not an improvement
    assert s.should_stop and "val loss" in s.reason
    assert (s.best_epoch, s.best_loss) == (2, 0.40)


def test_nan_loss_never_becomes_best():
    s = StoppingState(patience=5)
    s.update(1, 0.7, [0.1])
    assert s.update(2, float("nan"), [0.1]) is False
    assert s.best_epoch == 1


def test_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    s = StoppingState(f1_threshold=0.95, f1_patience=3, patience=4)
    fresh = StoppingState.from_dict(s.to_dict())
    assert math.isinf(fresh.best_loss)
    s.update(1, 0.3, [0.96, 0.97])
    s.update(2, 0.35, [0.97, 0.99])
    torch.save({"stopping": s.to_dict()}, tmp_path / "s.pt")
    loaded = StoppingState.from_dict(torch.load(tmp_path / "s.pt", weights_only=True)["stopping"])
    assert loaded == s
    loaded.update(3, 0.36, [0.99, 0.99])
    assert loaded.should_stop and loaded.epochs_above_threshold == 3
