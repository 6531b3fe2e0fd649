"""Per-frame counts -> PG fraction with a 95 % interval -> EWMA -> alarm; sizes; the CSV/JSON contract.

The alarm rule is an EWMA of the per-frame fraction of the watched class (PG) above
``alarm_fraction`` for ``alarm_frames`` consecutive frames. Why this and not a CUSUM on PG
counts (docs/monitor.md): the classifier calls a few CEX particles PG in every frame, so the
in-control PG count is not zero but a rate that depends on the particle count, which rises
through a batch; a fraction is normalised for that, its limit reads in the chemist's units
("alarm at 32 % PG"), and K consecutive frames stop one crowded frame from firing it.
One alarm per excursion: the rule re-arms once the EWMA has fallen back below the limit.

Sizes (:class:`SizeSummary`): per frame and per class (``all`` = every measured particle,
whatever its status; then each class among the classified ones) the number-weighted D10 / D50
/ D90 of the equivalent circle diameter and of the length, with a 95 % bootstrap interval of
each D50 (from :data:`MIN_FOR_INTERVAL` particles on), the median aspect ratio and the counts
per size class of the equivalent diameter (log-spaced, :class:`SizeClasses`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np

from crystalscope.errors import CrystalscopeError
from crystalscope.evaluation.metrics import wilson_interval

#: Column names shared by the writer (monitor) and readers (scoring, tests); the measures
#: follow (:func:`particle_columns`).
PARTICLE_COLUMNS = ("frame", "file", "time_s", "particle", "x0", "y0", "x1", "y1",
                    "class", "confidence", "status")
#: Measure columns of particles.csv after PARTICLE_COLUMNS; ``{u}`` is ``px`` or ``um``.
MEASURE_COLUMNS = ("area_{u}2", "ecd_{u}", "length_{u}", "width_{u}", "aspect", "solidity", "mean_intensity",
                   "sharpness", "touching")
ALL = "all"  # the size group of every measured particle, classified or not
#: Fewest particles of a group in a frame for a bootstrap interval of its D50.
MIN_FOR_INTERVAL = 5
BOOTSTRAP_DRAWS = 200
ALARM_RULE = "ewma"


def particle_columns(unit: str = "px") -> tuple[str, ...]:
    """particles.csv's header: the particle, its class, then its measures in ``unit``.

    Example:
        >>> particle_columns("um")[11:14]
        ('area_um2', 'ecd_um', 'length_um')
    """
    return (*PARTICLE_COLUMNS, *(c.format(u=unit) for c in MEASURE_COLUMNS))


@dataclass(frozen=True)
class SizeClasses:
    """Log-spaced size classes of the equivalent diameter, in the outputs' unit (px or um).

    Example:
        >>> SizeClasses(10, 1000, 2).edges().tolist()
        [10.0, 100.0, 1000.0]
    """

    low: float = 16.0
    high: float = 1024.0
    count: int = 12

    def __post_init__(self):
        if not (0 < self.low < self.high and 1 <= self.count <= 50):
            raise CrystalscopeError(f"--size-classes {self.low:g},{self.high:g},{self.count}: give LOW,HIGH,N "
                                    "with 0 < LOW < HIGH and 1 <= N <= 50 (e.g. 16,1024,12)")

    @classmethod
    def parse(cls, text: str) -> "SizeClasses":
        """``"LOW,HIGH,N"`` (the ``--size-classes`` option) as size classes.

        Example:
            >>> SizeClasses.parse("20,2000,4").edges().round(1).tolist()
            [20.0, 63.2, 200.0, 632.5, 2000.0]
        """
        parts = text.split(",")
        try:
            low, high, count = float(parts[0]), float(parts[1]), int(parts[2])
            if len(parts) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise CrystalscopeError(f"--size-classes {text!r}: give LOW,HIGH,N (e.g. 16,1024,12)") from None
        return cls(low, high, count)

    def edges(self) -> np.ndarray:
        return np.geomspace(self.low, self.high, self.count + 1)

    def names(self, unit: str) -> list[str]:
        e = self.edges()
        return [f"{e[i]:.4g}-{e[i + 1]:.4g}{unit}" for i in range(self.count)]


@dataclass(frozen=True)
class SizeSummary:
    """Sizes of one group of a frame's particles (see the module docstring); ``None`` when empty."""

    n: int = 0
    ecd: tuple[float, float, float] | None = None      # D10, D50, D90
    ecd_d50_ci: tuple[float, float] | None = None
    length: tuple[float, float, float] | None = None
    length_d50_ci: tuple[float, float] | None = None
    aspect_median: float | None = None
    class_counts: tuple[int, ...] = ()


def summarise_sizes(sizes: list[tuple[float, float, float]], classes: SizeClasses, seed: list[int]) -> SizeSummary:
    """D10/D50/D90 (+ bootstrap 95 % interval of D50) of ``(ecd, length, aspect)`` rows, counts per class.

    The bootstrap draws come from ``seed`` (frame, group), so a rerun gives the same intervals.

    Example:
        >>> s = summarise_sizes([(d, 2 * d, 2.0) for d in range(10, 110, 10)], SizeClasses(1, 1000, 3), [0])
        >>> s.ecd[1], s.length[1], s.aspect_median, s.class_counts
        (55.0, 110.0, 2.0, (0, 9, 1))
    """
    edges = classes.edges()
    if not sizes:
        return SizeSummary(class_counts=(0,) * classes.count)
    values = np.asarray(sizes, dtype=float)
    ecd, length = values[:, 0], values[:, 1]
    counts, _ = np.histogram(np.clip(ecd, edges[0], edges[-1]), bins=edges)
    return SizeSummary(n=len(values), ecd=_deciles(ecd), ecd_d50_ci=_median_interval(ecd, seed + [0]),
                       length=_deciles(length), length_d50_ci=_median_interval(length, seed + [1]),
                       aspect_median=float(np.median(values[:, 2])), class_counts=tuple(int(c) for c in counts))


def _deciles(values: np.ndarray) -> tuple[float, float, float]:
    d10, d50, d90 = np.percentile(values, [10, 50, 90])
    return float(d10), float(d50), float(d90)


def _median_interval(values: np.ndarray, seed: list[int]) -> tuple[float, float] | None:
    if len(values) < MIN_FOR_INTERVAL:
        return None  # a handful of particles: an interval of the median says nothing
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    medians = np.median(values[rng.integers(0, len(values), size=(BOOTSTRAP_DRAWS, len(values)))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


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
    #: measured particles' ``(ecd, length, aspect)`` in the outputs' unit, by group (``all``, classes)
    particle_sizes: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    touching: int = 0  # measured particles that touch another (split from one region)
    sizes: dict[str, SizeSummary] = field(default_factory=dict)  # filled by Timeline.add
    agglomeration: float | None = None  # share of measured particles (and clusters) touching another


class Timeline:
    """Accumulates frames, smooths the fraction and raises alarms as frames arrive.

    Example:
        >>> t = Timeline(["cex", "pg"], "pg", AlarmRule(fraction=0.2, frames=2, smoothing=1.0))
        >>> for i, pg in enumerate([0, 5, 5]):  # smoothing 1.0: the EWMA is the fraction itself
        ...     _ = t.add(FrameRecord(i, f"f{i}.png", 10.0 * i, {"cex": 5, "pg": pg}))
        >>> [a["frame"] for a in t.alarms]
        [2]
    """

    def __init__(self, class_names: list[str], watched: str, rule: AlarmRule, unit: str = "px",
                 size_classes: SizeClasses = SizeClasses(), um_per_px: float | None = None):
        self.class_names, self.watched, self.rule = list(class_names), watched, rule
        self.unit, self.size_classes, self.um_per_px = unit, size_classes, um_per_px
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
        self._add_sizes(record)
        self.records.append(record)
        return record

    def groups(self) -> list[str]:
        return [ALL, *self.class_names]

    def _add_sizes(self, record: FrameRecord) -> None:
        for g, group in enumerate(self.groups()):
            record.sizes[group] = summarise_sizes(record.particle_sizes.get(group, []), self.size_classes,
                                                  [record.frame, g])
        measured = len(record.particle_sizes.get(ALL, [])) + record.clusters
        record.agglomeration = (record.touching + record.clusters) / measured if measured else None

    def size_columns(self) -> list[str]:
        """timeline.csv's size columns: per group D10/D50/D90 (ECD, length), D50 intervals, aspect, classes."""
        u, names = self.unit, self.size_classes.names(self.unit)
        columns = ["n_measured", "agglomeration", "um_per_px"]
        for g in self.groups():
            for measure in ("ecd", "length"):
                columns += [f"{g}_{measure}_d10_{u}", f"{g}_{measure}_d50_{u}", f"{g}_{measure}_d50_low",
                            f"{g}_{measure}_d50_high", f"{g}_{measure}_d90_{u}"]
            columns += [f"{g}_aspect_median", *(f"{g}_n_ecd_{name}" for name in names)]
        return columns

    def _size_values(self, r: FrameRecord) -> list:
        values = [len(r.particle_sizes.get(ALL, [])), _fmt(r.agglomeration),
                  "" if self.um_per_px is None else f"{self.um_per_px:g}"]
        for g in self.groups():
            s = r.sizes.get(g, SizeSummary(class_counts=(0,) * self.size_classes.count))
            for deciles, ci in ((s.ecd, s.ecd_d50_ci), (s.length, s.length_d50_ci)):
                d10, d50, d90 = deciles or (None, None, None)
                low, high = ci or (None, None)
                values += [_fmt(d10), _fmt(d50), _fmt(low), _fmt(high), _fmt(d90)]
            values += [_fmt(s.aspect_median), *s.class_counts]
        return values

    def columns(self) -> list[str]:
        return ["frame", "file", "time_s", "n_particles", *[f"n_{c}" for c in self.class_names], "rejected",
                "out_of_focus", "clusters", "uncertain", "errors", f"{self.watched}_fraction", "ci95_low", "ci95_high", "ewma", "alarm", "status",
                *self.size_columns()]

    def csv_text(self) -> str:
        """``timeline.csv``: one row per frame (blank fraction when nothing was classified)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns())
        writer.writerows(self._rows())
        return buffer.getvalue()

    def rows(self) -> list[dict]:
        """timeline.csv as a list of dicts (``pandas.DataFrame(timeline.rows())``); blanks are ``None``.

        Example:
            >>> t = Timeline(["cex", "pg"], "pg", AlarmRule())
            >>> _ = t.add(FrameRecord(0, "f0.png", 0.0, {"cex": 2, "pg": 0}, particle_sizes={"all": [(100.0, 120.0, 1.2)]}))
            >>> row = t.rows()[0]; row["n_measured"], row["all_ecd_d50_px"], row["pg_ecd_d50_px"]
            (1, 100.0, None)
        """
        columns = self.columns()
        return [{c: _value(v) for c, v in zip(columns, row)} for row in self._rows()]

    def _rows(self) -> list[list]:
        alarm_frames = {a["frame"] for a in self.alarms}
        rows = []
        for r in self.records:
            counts = [r.counts.get(c, 0) for c in self.class_names]
            rows.append([r.frame, r.file, "" if r.time_s is None else f"{r.time_s:.3f}", sum(counts) + r.rejected + r.out_of_focus + r.clusters + r.uncertain + r.errors,
                         *counts, r.rejected, r.out_of_focus, r.clusters, r.uncertain, r.errors, _fmt(r.fraction), _fmt(r.low), _fmt(r.high), _fmt(r.ewma),
                         int(r.frame in alarm_frames), r.status, *self._size_values(r)])
        return rows


def _value(text):
    """A CSV cell back as a number where it is one (blank: ``None``)."""
    if not isinstance(text, str):
        return text
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"
