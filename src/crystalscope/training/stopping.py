"""When to stop training, and which epoch's weights are "best".

Two rules, as in the reference study plus a safety net:
- every class's validation F1 is at least ``f1_threshold`` for ``f1_patience`` consecutive
  epochs (the reference's callback stops at the first such epoch, i.e. patience 1);
- validation loss has not improved for ``patience`` epochs.

The best weights are those of the epoch with the lowest validation loss. The state is a plain
dict of numbers so it travels inside checkpoints (``torch.load(weights_only=True)``) and a
resumed run continues counting where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class StoppingState:
    """Counters of the two stopping rules.

    Example:
        >>> s = StoppingState(f1_threshold=0.99, f1_patience=1, patience=5)
        >>> s.update(1, val_loss=0.3, class_f1=[0.995, 0.992])
        True
        >>> s.should_stop, s.reason
        (True, 'every class F1 >= 0.99 for 1 epoch(s)')
    """

    f1_threshold: float = 0.997
    f1_patience: int = 1
    patience: int = 10
    best_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    epochs_above_threshold: int = 0
    should_stop: bool = False
    reason: str = ""

    def update(self, epoch: int, val_loss: float, class_f1: list[float]) -> bool:
        """Record one epoch; returns True when it is the new best (lowest val loss)."""
        improved = val_loss < self.best_loss
        if improved:
            self.best_loss, self.best_epoch = float(val_loss), int(epoch)
            self.epochs_without_improvement = 0
        else:
            self.epochs_without_improvement += 1
        above = len(class_f1) > 0 and all(f >= self.f1_threshold for f in class_f1)
        self.epochs_above_threshold = self.epochs_above_threshold + 1 if above else 0
        if self.epochs_above_threshold >= self.f1_patience:
            self.should_stop = True
            self.reason = f"every class F1 >= {self.f1_threshold} for {self.f1_patience} epoch(s)"
        elif self.epochs_without_improvement >= self.patience:
            self.should_stop = True
            self.reason = f"val loss did not improve for {self.patience} epoch(s)"
        return improved

    def to_dict(self) -> dict:
        d = asdict(self)
        if math.isinf(d["best_loss"]):
            d["best_loss"] = None  # inf is not JSON; None round-trips through YAML/JSON/torch
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StoppingState":
        d = dict(d)
        if d.get("best_loss") is None:
            d["best_loss"] = math.inf
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
