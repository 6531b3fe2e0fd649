"""Per-frame counts -> PG fraction with a 95 % interval -> EWMA -> alarm; the CSV/JSON contract.

The alarm rule is an EWMA of the per-frame fraction of the watched class (PG) above
``alarm_fraction`` for ``alarm_frames`` consecutive frames. Why this and not a CUSUM on PG
counts (docs/monitor.md): the classifier calls a few CEX particles PG in every frame, so the
in-control PG count is not zero but a rate that depends on the particle count, which rises
through a batch; a fraction is normalised for that, its limit reads in the chemist's units
("alarm at 32 % PG"), and K consecutive frames stop one crowded frame from firing it.
One alarm per excursion: the rule re-arms once the EWMA has fallen back below the limit.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from crystalscope.evaluation.metrics import wilson_interval

#: Column names shared by the writer (monitor) and readers (scoring, tests).
PARTICLE_COLUMNS = ("frame", "file", "time_s", "particle", "x0", "y0", "x1", "y1",
                    "class", "confidence", "status")
ALARM_RULE = "ewma"


@dataclass(frozen=True)
class AlarmRule:
    """EWMA alarm settings.

    Attributes:
        fraction: limit on the smoothed fraction (0..1).
        frames: consecutive frames above the limit before the alarm fires (K).
        smoothing: EWMA weight of the newest frame (lambda, 0..1].
    """

    # calibrated on generated 1024 x 768 runs (seeds 101-104): the lowest limit with at most 0.05
    # false alarms per hour on resampled in-control runs, K and lambda by onset delay (docs/monitor.md)
    fraction: float = 0.32
    frames: int = 2
    smoothing: float = 0.1

    def describe(self) -> str:
        return (f"EWMA(lambda={self.smoothing:g}) of the per-frame fraction above {self.fraction:g} "
                f"for {self.frames} consecutive frames")


@dataclass
class FrameRecord:
    """The outcome of one frame: counts per class, or the error that made it unreadable."""

    frame: int
    file: str
    time_s: float | None  # seconds since the first readable frame; None: unreadable, no time
    counts: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    out_of_focus: int = 0
    clusters: int = 0
    uncertain: int = 0
    errors: int = 0
    status: str = "ok"
    fraction: float | None = None
    low: float | None = None
    high: float | None = None
    ewma: float | None = None
    above: int = 0


class Timeline:
    """Accumulates frames, smooths the fraction and raises alarms as frames arrive.

    Example:
        >>> t = Timeline(["cex", "pg"], "pg", AlarmRule(fraction=0.2, frames=2, smoothing=1.0))
        >>> for i, pg in enumerate([0, 5, 5]):  # smoothing 1.0: the EWMA is the fraction itself
        ...     _ = t.add(FrameRecord(i, f"f{i}.png", 10.0 * i, {"cex": 5, "pg": pg}))
        >>> [a["frame"] for a in t.alarms]
        [2]
    """

    def __init__(self, class_names: list[str], watched: str, rule: AlarmRule):
        self.class_names, self.watched, self.rule = list(class_names), watched, rule
        self.records: list[FrameRecord] = []
        self.alarms: list[dict] = []

    def add(self, record: FrameRecord) -> FrameRecord:
        """Score one frame (fraction, interval, EWMA) and check the alarm rule."""
        previous = self.records[-1] if self.records else None
        last_ewma = previous.ewma if previous else None
        n = sum(record.counts.get(c, 0) for c in self.class_names)
        if record.status == "ok" and n > 0:
            k = record.counts.get(self.watched, 0)
            record.fraction = k / n
            record.low, record.high = wilson_interval(k, n)
            lam = self.rule.smoothing
            # the chart starts at 0 (a batch starts without PG), so one misread first frame cannot fire it
            record.ewma = lam * record.fraction + (1 - lam) * (last_ewma or 0.0)
        else:
            record.ewma = last_ewma  # an empty or unreadable frame carries no news
        above = record.ewma is not None and record.ewma > self.rule.fraction
        record.above = (previous.above + 1 if previous else 1) if above else 0
        if record.time_s is None:  # a frame without a time (unreadable) neither counts nor alarms
            record.above = previous.above if previous else 0
        elif record.above == self.rule.frames:
            self.alarms.append({"time_s": round(record.time_s, 3), "frame": record.frame,
                                "file": record.file, "rule": f"{ALARM_RULE}: {self.rule.describe()}",
                                "ewma": round(record.ewma, 6)})
        self.records.append(record)
        return record

    def columns(self) -> list[str]:
        return ["frame", "file", "time_s", "n_particles", *[f"n_{c}" for c in self.class_names], "rejected",
                "out_of_focus", "clusters", "uncertain", "errors", f"{self.watched}_fraction", "ci95_low", "ci95_high", "ewma", "alarm", "status"]

    def csv_text(self) -> str:
        """``timeline.csv``: one row per frame (blank fraction when nothing was classified)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns())
        alarm_frames = {a["frame"] for a in self.alarms}
        for r in self.records:
            counts = [r.counts.get(c, 0) for c in self.class_names]
            writer.writerow([r.frame, r.file, "" if r.time_s is None else f"{r.time_s:.3f}", sum(counts) + r.rejected + r.out_of_focus + r.clusters + r.uncertain + r.errors,
                             *counts, r.rejected, r.out_of_focus, r.clusters, r.uncertain, r.errors, _fmt(r.fraction), _fmt(r.low), _fmt(r.high), _fmt(r.ewma),
                             int(r.frame in alarm_frames), r.status])
        return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"
