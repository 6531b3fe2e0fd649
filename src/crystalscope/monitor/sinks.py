"""Where a monitored frame goes once it is scored: the sinks of the monitor's pipeline.

frame -> regions -> particles -> classified -> a :class:`FrameSummary` -> sinks. A sink is
anything with ``start(run)``, ``frame(summary)`` and ``close(result)``: the output files
(:class:`FileSink`), the OPC UA server (:mod:`crystalscope.monitor.opcua`), a progress line.
Adding one touches no stage. Sinks are called in order on the monitor's thread; one that
talks to the network must hand the summary on (a queue) and return, so a slow reader never
holds up the next frame.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from crystalscope.io import record_files, write_bytes, write_json, write_text
from crystalscope.monitor.overlay import sizes_png, timeline_png
from crystalscope.monitor.timeline import AlarmRule, FrameRecord, Timeline, particle_columns

log = logging.getLogger(__name__)

#: written once at the start of a run: its name, classes and alarm rule (the live page reads it)
RUN_FILE = "run.json"
#: what :class:`FileSink` rewrites after each frame (``--watch``) or at the end
OUTPUT_FILES = ("particles.csv", "timeline.csv", "timeline.png", "sizes.png", "alarms.json")
#: named in the output folder's manifest: --force replaces only what a monitor wrote
COMMAND = "monitor"


@dataclass(frozen=True)
class RunInfo:
    """What a sink knows about a run before its first frame.

    Attributes:
        name: the run's name (``--run-name``, default the frames folder's name).
        frames_dir, out_dir: the watched folder and the output folder.
        timeline: the run's live timeline (class names, watched class, rule, records, alarms);
            sinks read it, only the monitor writes it.
        particles: the run's live ``particles.csv`` rows (read-only for sinks).
        unrecorded: files the monitor wrote into ``out_dir`` (overlays) that the folder's
            manifest does not list yet; :class:`FileSink` records and empties it.
    """

    name: str
    frames_dir: Path
    out_dir: Path
    timeline: Timeline
    particles: list[list]
    unrecorded: list[Path] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return self.timeline.class_names

    @property
    def rule(self) -> AlarmRule:
        return self.timeline.rule


@dataclass(frozen=True)
class FrameSummary:
    """One scored frame, as every sink receives it.

    Attributes:
        record: the frame's counts, fraction, interval and EWMA.
        source_time: the frame's time as a POSIX timestamp (the first frame's file time plus
            ``record.time_s``): what a historian stores as the value's source time.
        alarm: the alarm this frame fired (a row of ``alarms.json``), else ``None``.
        alarm_active: whether the EWMA is above the limit for K frames or more now.
        truth_onset_s: the generated run's PG onset relative to the first frame, if known.
    """

    record: FrameRecord
    source_time: float
    alarm: dict | None
    alarm_active: bool
    truth_onset_s: float | None = None


class Sink(Protocol):
    """Receives a run's frames; see :class:`FileSink` for the smallest real one."""

    def start(self, run: RunInfo) -> None: ...

    def frame(self, summary: FrameSummary) -> None: ...

    def close(self, result: dict) -> None: ...


class FileSink:
    """particles.csv, timeline.csv, timeline.png, sizes.png and alarms.json, each rewritten atomically,
    and the output folder's manifest after each rewrite.

    Args:
        each_frame: rewrite after every frame (``--watch``: a reader always sees the latest
            frame); otherwise only once, at :meth:`close`.

    Example:
        >>> sink = FileSink(each_frame=True)  # run_monitor adds one to every run
    """

    def __init__(self, each_frame: bool = False):
        self.each_frame = each_frame
        self.run: RunInfo | None = None
        self.truth_onset_s: float | None = None

    def start(self, run: RunInfo) -> None:
        self.run = run
        rule = run.rule
        write_json(run.out_dir / RUN_FILE, {
            "run": run.name, "class_names": run.class_names, "watched": run.timeline.watched,
            "rule": {"fraction": rule.fraction, "frames": rule.frames, "smoothing": rule.smoothing,
                     "describe": rule.describe()}})
        record_files(run.out_dir, [run.out_dir / RUN_FILE], COMMAND)

    def frame(self, summary: FrameSummary) -> None:
        self.truth_onset_s = summary.truth_onset_s
        if self.each_frame:
            self.write()

    def close(self, result: dict) -> None:
        self.write()

    def write(self) -> None:
        """Rewrite the outputs atomically (readers never see a half-written file)."""
        run = self.run
        write_text(run.out_dir / "particles.csv", particles_csv(run.particles, run.timeline.unit))
        write_text(run.out_dir / "timeline.csv", run.timeline.csv_text())
        write_bytes(run.out_dir / "timeline.png", timeline_png(run.timeline, self.truth_onset_s))
        write_bytes(run.out_dir / "sizes.png", sizes_png(run.timeline))
        write_json(run.out_dir / "alarms.json", run.timeline.alarms)
        # the folder's manifest follows every rewrite, so a --force rerun (even after a kill) finds it ours
        record_files(run.out_dir, [*(run.out_dir / name for name in OUTPUT_FILES), *run.unrecorded], COMMAND)
        run.unrecorded.clear()


class CallbackSink:
    """Calls ``on_frame(record)`` after each frame (the CLI's progress line)."""

    def __init__(self, on_frame: Callable[[FrameRecord], None]):
        self.on_frame = on_frame

    def start(self, run: RunInfo) -> None:
        pass

    def frame(self, summary: FrameSummary) -> None:
        self.on_frame(summary.record)

    def close(self, result: dict) -> None:
        pass


class Sinks:
    """The run's sinks, called in order; every sink is closed even when one fails to close.

    Example:
        >>> sinks = Sinks([FileSink()])  # doctest: +SKIP
        >>> sinks.start(run); sinks.frame(summary); sinks.close(result)  # doctest: +SKIP
    """

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)
        self.started: list[Sink] = []

    def start(self, run: RunInfo) -> None:
        for sink in self.sinks:
            sink.start(run)
            self.started.append(sink)

    def frame(self, summary: FrameSummary) -> None:
        for sink in self.started:
            sink.frame(summary)

    def close(self, result: dict) -> None:
        failure = None
        for sink in reversed(self.started):
            try:
                sink.close(result)
            except Exception as exc:  # noqa: BLE001 - the files must still be written; re-raised below
                log.error("closing %s: %s", type(sink).__name__, exc)
                failure = failure or exc
        self.started = []
        if failure is not None:
            raise failure


def particles_csv(rows: list[list], unit: str = "px") -> str:
    """``particles.csv`` text: the header of :func:`particle_columns` in ``unit`` and one row per region."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(particle_columns(unit))
    writer.writerows(rows)
    return buffer.getvalue()
