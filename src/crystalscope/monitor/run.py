"""The ``monitor`` command: probe frames in a folder -> particles.csv, timeline.csv/png, alarms.json.

One pass over the frames already there, or ``watch=True`` to keep polling the folder and
process frames as they appear (a file is taken once its size has stopped changing, so a
frame still being copied is not read half-written). The outputs are rewritten atomically
after every frame in watch mode (and at the end of a pass); Ctrl-C (SIGINT) finishes the
frame in hand, writes everything and returns. A frame that cannot be read becomes a timeline
row with its error. Classification goes through :class:`Predictor` (ONNX Runtime for an
``.onnx``: no torch), so rejection of foreign regions applies when the model has it: only
``status == "ok"`` particles are counted as classified; errors are counted apart and every
other status (``rejected``, ...) in the ``rejected`` column.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from crystalscope.data.images import ImageReadError, load_rgb
from crystalscope.data.layout import list_images
from crystalscope.errors import CrystalscopeError, check_number
from crystalscope.inference.predictor import Prediction, Predictor
from crystalscope.io import remove_recorded, write_bytes
from crystalscope.runtime import first_line
from crystalscope.safety import claim_output
from crystalscope.monitor.detect import DETECTORS, MAX_PARTICLE_SIDE, MIN_SHARPNESS, cut_crops, to_grey
from crystalscope.monitor.frames import frame_sort_key, raw_frame_time, read_truth
from crystalscope.monitor.measure import MeasuredParticle, Scale, particles_of
from crystalscope.monitor.overlay import overlay_jpeg
from crystalscope.monitor.sinks import (COMMAND, OUTPUT_FILES, CallbackSink, FileSink, FrameSummary, RunInfo, Sink,
                                        Sinks)
from crystalscope.monitor.timeline import ALL, AlarmRule, FrameRecord, SizeClasses, Timeline, particle_columns

log = logging.getLogger(__name__)

OVERLAY_SUBDIR = "overlay"
#: Statuses of regions the monitor does not count as classified particles (besides the model's
#: own ``rejected`` and ``error: ...``): too blurred, several particles in one region, or a
#: classification below ``min_confidence``.
OUT_OF_FOCUS, CLUSTER, UNCERTAIN = "out of focus", "cluster", "uncertain"
#: Default smallest confidence counted: PG calls of true CEX had a median of 0.84, of true PG 1.0.
MIN_CONFIDENCE = 0.9


@dataclass(frozen=True)
class MonitorSettings:
    """How to watch a run.

    Attributes:
        rule: the alarm rule (limit, K frames, EWMA weight).
        detector: ``segment`` or ``tiles`` (see :mod:`crystalscope.monitor.detect`).
        batch_size: crops per forward pass.
        overlay: also write ``overlay/<frame>.jpg`` with boxes coloured by class.
        poll_s: seconds between looks at the folder in watch mode.
        min_sharpness: regions less sharp than this are not classified (``out of focus``); 0 keeps all.
        max_side: regions with a longer side are not classified (``cluster``).
        min_confidence: classifications below this are written but not counted (``uncertain``).
        um_per_px: the frames' scale; sizes are then in um (else px, and the outputs say so).
        size_classes: log-spaced classes of the equivalent diameter, in the outputs' unit.
        split: split touching particles (watershed) before measuring and classifying them.
        settle_s: in watch mode, a frame that does not decode is retried until its size has
            stayed the same this many seconds (a copy in progress), then recorded as an error.
    """

    rule: AlarmRule = field(default_factory=AlarmRule)
    detector: str = "segment"
    batch_size: int = 32
    overlay: bool = False
    poll_s: float = 0.5
    min_sharpness: float = MIN_SHARPNESS
    max_side: int = MAX_PARTICLE_SIDE
    min_confidence: float = MIN_CONFIDENCE
    um_per_px: float | None = None
    size_classes: SizeClasses = field(default_factory=SizeClasses)
    split: bool = True
    settle_s: float = 3.0


class FrameTimeError(CrystalscopeError):
    """A frame whose time is unknown or earlier than the frame before it (an error row)."""


class Monitor:
    """State of one monitored run: frames seen so far, their particles, the timeline.

    Example:
        >>> m = Monitor(Predictor.load("model.onnx"), "frames/", "out/")  # doctest: +SKIP
        >>> m.process(Path("frames/frame_00000_t000000.00s.png")).status  # doctest: +SKIP
        'ok'
    """

    def __init__(self, predictor: Predictor, frames_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 settings: MonitorSettings = MonitorSettings()):
        self.predictor, self.settings = predictor, settings
        self.frames_dir, self.out_dir = Path(frames_dir), Path(out_dir)
        watched = predictor.positive_class or predictor.class_names[-1]
        self.scale = Scale(settings.um_per_px)
        self.timeline = Timeline(predictor.class_names, watched, settings.rule, self.scale.unit,
                                 settings.size_classes, settings.um_per_px)
        self.particles: list[list] = []
        self.truth_onset_s = (read_truth(self.frames_dir) or {}).get("onset_s")
        self._first_time: float | None = None
        self.unrecorded: list[Path] = []  # overlays written since the manifest last listed them
        self._last_time: float | None = None

    def frame_time(self, path: Path) -> float:
        """Seconds since the first readable frame: from the name (``..._t000360.00s.png``), else the mtime.

        Called once a frame has decoded, so an unreadable frame never sets the origin.

        Raises:
            FrameTimeError: the frame has no time (no stat), or it is earlier than the frame
                before it (the timeline never goes backwards).
        """
        raw = raw_frame_time(path)
        if raw is None:
            raise FrameTimeError(f"{path}: no time in its name and no modification time")
        if self._last_time is not None and raw < self._last_time:
            raise FrameTimeError(f"{path}: taken at {raw - self._first_time:.3f} s, before the frame before it "
                                 f"({self._last_time - self._first_time:.3f} s): the timeline never goes back")
        if self._first_time is None:
            self._first_time = raw
        self._last_time = raw
        return raw - self._first_time

    def process(self, path: Path) -> FrameRecord:
        """Detect, crop and classify one frame; an unreadable frame gives an error record."""
        index = len(self.timeline.records)
        record = FrameRecord(index, path.name, None)  # no time until it decodes
        try:
            image = load_rgb(path)
            record.time_s = self.frame_time(path)
        except (ImageReadError, FrameTimeError) as exc:
            record.status = f"error: {first_line(exc, limit=None, without=str(path))}"
            log.warning("frame %s: %s", path.name, record.status)
            return self.timeline.add(record)
        # converted to grey once: detection, the crops and the overlay all read this one frame
        image = image.convert("L")
        grey = to_grey(image)
        found = particles_of(grey, self.settings.detector, self.settings.max_side, self.settings.split)
        screened = [self._screen(m) for m in found]
        crops = cut_crops(image, [m.region for m, status in zip(found, screened) if status is None])
        predictions = iter(self.predictor.predict(crops, batch_size=self.settings.batch_size))
        record.counts = {c: 0 for c in self.predictor.class_names}
        shown = []
        for k, (measured, status) in enumerate(zip(found, screened)):
            p = next(predictions) if status is None else Prediction(path="", status=status)
            if p.status == "ok" and p.confidence < self.settings.min_confidence:
                p.status = UNCERTAIN
            _count(record, p)
            self._add_size(record, measured, p)
            confidence = f"{p.confidence:.6f}" if p.confidence is not None else ""
            self.particles.append([index, path.name, f"{record.time_s:.3f}", k, *measured.region.box,
                                   p.predicted or "", confidence, p.status, *measured.row(self.scale)])
            shown.append({"box": measured.region.box, "class": p.predicted, "confidence": p.confidence or 0.0,
                          "status": p.status, "size": measured.label(self.scale)})
        if self.settings.overlay:
            self.unrecorded.append(write_bytes(self.out_dir / OVERLAY_SUBDIR / f"{path.stem}.jpg",
                                                overlay_jpeg(image, shown)))
        return self.timeline.add(record)

    def _screen(self, measured: MeasuredParticle) -> str | None:
        """Why a region is not classified (``cluster``, ``out of focus``), or ``None`` to classify it."""
        x0, y0, x1, y1 = measured.region.box
        if measured.cluster or max(x1 - x0, y1 - y0) > self.settings.max_side:
            return CLUSTER
        if measured.sharpness < self.settings.min_sharpness:
            return OUT_OF_FOCUS
        return None

    def _add_size(self, record: FrameRecord, measured: MeasuredParticle, p: Prediction) -> None:
        """A measured particle's sizes into its frame's groups: ``all``, and its class when counted."""
        if measured.ecd_px is None:
            return
        sizes = (self.scale.length(measured.ecd_px), self.scale.length(measured.length_px), measured.aspect)
        record.particle_sizes.setdefault(ALL, []).append(sizes)
        record.touching += measured.touching
        if p.status == "ok":
            record.particle_sizes.setdefault(p.predicted, []).append(sizes)

    def particle_rows(self) -> list[dict]:
        """particles.csv as dicts, one per particle (``pandas.DataFrame(monitor.particle_rows())``)."""
        return [dict(zip(particle_columns(self.scale.unit), row)) for row in self.particles]

    def truth_onset_s_relative(self) -> float | None:
        """The generated run's PG onset in seconds since the first frame (``None`` without truth)."""
        if self.truth_onset_s is None or self._first_time is None:
            return None
        return float(self.truth_onset_s) - self._first_time

    def summary(self, seconds: float, interrupted: bool) -> dict:
        records = self.timeline.records
        return {"out_dir": str(self.out_dir), "backend": self.predictor.backend_name,
                "n_frames": len(records), "n_frame_errors": sum(r.status != "ok" for r in records),
                "n_particles": len(self.particles), "alarms": list(self.timeline.alarms),
                "watched": self.timeline.watched, "rule": self.settings.rule.describe(),
                "truth_onset_s": self.truth_onset_s, "seconds": round(seconds, 3), "interrupted": interrupted,
                "outputs": [str(self.out_dir / name) for name in OUTPUT_FILES]}


def _count(record: FrameRecord, p: Prediction) -> None:
    """Add one region to the frame's counts: only ``ok`` is a classified particle."""
    if p.status == "ok":
        record.counts[p.predicted] += 1
    elif p.status == OUT_OF_FOCUS:
        record.out_of_focus += 1
    elif p.status == CLUSTER:
        record.clusters += 1
    elif p.status == UNCERTAIN:
        record.uncertain += 1
    elif p.status.startswith("error"):
        record.errors += 1
    else:
        record.rejected += 1  # "rejected" and any future status of the model: not classified


class _StopFlag:
    """Set by SIGINT (Ctrl-C) so the loop stops between frames, never inside a write."""

    def __init__(self):
        self.stopped = False
        self._previous = None

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        log.info("interrupted: finishing the current frame and writing the outputs")
        self.stopped = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _check_options(frames_dir: Path, settings: MonitorSettings) -> None:
    if not frames_dir.is_dir():
        raise CrystalscopeError(f"FRAMES_DIR {frames_dir}: folder not found")
    rule = settings.rule
    # every number finite and in range (nan passes every comparison); limits that would make the
    # monitor classify nothing (a --max-side of 0) are refused, not run
    check_number("--alarm-fraction", rule.fraction, 0, 1, low_open=True, high_open=True)
    check_number("--alarm-frames", rule.frames, 1)
    check_number("--smoothing", rule.smoothing, 0, 1, low_open=True)
    check_number("--min-confidence", settings.min_confidence, 0, 1)
    check_number("--min-sharpness", settings.min_sharpness, 0)
    check_number("--max-side", settings.max_side, 1)
    check_number("--poll-s", settings.poll_s, 0, low_open=True)
    check_number("--settle-s", settings.settle_s, 0)
    if settings.detector not in DETECTORS:
        raise CrystalscopeError(f"--detector {settings.detector!r} is not known: use one of {', '.join(DETECTORS)}")
    if settings.batch_size < 1:
        raise CrystalscopeError(f"--batch-size {settings.batch_size} must be 1 or more")


class _FolderWatch:
    """New frames of a folder, in :func:`frame_sort_key` order, each handed out once.

    A frame is handed out once its size has stayed the same for one poll and it decodes; one
    that does not decode is retried until its size has been the same for ``settle_s`` seconds
    (a copy still in progress), and only then handed out to become an error row.
    """

    def __init__(self, folder: Path, settle_s: float = 3.0):
        self.folder, self.settle_s = folder, settle_s
        self.done: set[str] = set()
        self._sizes: dict[str, tuple[int, float]] = {}  # name: (size, when it was first seen at that size)

    def ready(self) -> list[Path]:
        found = []
        now = time.monotonic()
        for path in list_images(self.folder, recursive=False):
            if path.name in self.done:
                continue
            try:
                size = path.stat().st_size
            except OSError:
                if not os.path.lexists(path):
                    continue  # removed or renamed between the listing and the stat
                size = -1  # a broken link: its error row comes once it has settled
            seen = self._sizes.get(path.name)
            if seen is None or seen[0] != size:
                self._sizes[path.name] = (size, now)
            elif now - seen[1] >= self.settle_s or _decodes(path):
                found.append(path)
        for path in found:
            self.done.add(path.name)
        return sorted(found, key=frame_sort_key)


def _decodes(path: Path) -> bool:
    try:
        load_rgb(path)
    except ImageReadError:
        return False
    return True


def run_monitor(model: str | os.PathLike, frames_dir: str | os.PathLike, out_dir: str | os.PathLike,
                settings: MonitorSettings = MonitorSettings(), watch: bool = False,
                on_frame: Callable[[FrameRecord], None] | None = None, force: bool = False,
                sinks: Sequence[Sink] = (), run_name: str | None = None) -> dict:
    """Monitor the frames in ``frames_dir`` with ``model`` and write the outputs into ``out_dir``.

    Args:
        model: ``.onnx`` (ONNX Runtime, no torch) or ``.ckpt``.
        frames_dir: folder of frames; times come from ``..._t<seconds>s.png`` names, else mtimes.
        out_dir: where ``particles.csv``, ``timeline.csv``, ``timeline.png``, ``alarms.json``
            (and ``overlay/``) go.
        settings: detector, alarm rule, batch size, overlays, poll interval.
        watch: keep processing frames as they appear until SIGINT (Ctrl-C).
        on_frame: called after each frame (progress display).
        force: replace an earlier monitor output in ``out_dir`` (a folder holding anything
            else is refused: :func:`crystalscope.safety.claim_output`).
        sinks: more receivers of each frame summary, called before the files (e.g. an
            :class:`~crystalscope.monitor.opcua.OpcUaSink`); started before the first frame,
            closed after the last.
        run_name: the run's name for the sinks (default: the frames folder's name).

    Returns:
        The summary of :meth:`Monitor.summary` (frames, particles, alarms, seconds, interrupted).

    Example:
        >>> s = run_monitor("model.onnx", "run/frames", "run/monitor")  # doctest: +SKIP
        >>> s["alarms"][0]["time_s"]  # doctest: +SKIP
        2040.0
    """
    frames_dir, out_dir = Path(frames_dir), Path(out_dir)
    _check_options(frames_dir, settings)
    frames = [] if watch else sorted(list_images(frames_dir, recursive=False), key=frame_sort_key)
    if not watch and not frames:
        raise CrystalscopeError(f"FRAMES_DIR {frames_dir}: no image files (png, jpg, tif, bmp); "
                                "add --watch to wait for frames")
    # the one output rule: never inside the frames or onto the model, an earlier monitor output
    # replaced only with --force, one monitor per folder. Outputs are rewritten in place after
    # every frame (each file atomically), so a watcher always reads complete files.
    with claim_output(out_dir, inputs=[model, frames_dir], kind="folder", force=force, command=COMMAND):
        # claim_output proved that an earlier monitor wrote every file there
        remove_recorded(out_dir, keep_folder=True)
        monitor = Monitor(Predictor.load(model), frames_dir, out_dir, settings)
        # the given sinks first: an OPC UA sink only queues the frame, and the DCS should not wait
        # for timeline.png to be drawn
        receivers = [*sinks, FileSink(each_frame=watch), *([CallbackSink(on_frame)] if on_frame else [])]
        run = RunInfo(run_name or frames_dir.resolve().name, frames_dir, out_dir, monitor.timeline, monitor.particles,
                      monitor.unrecorded)
        return _run(monitor, frames, settings, watch, Sinks(receivers), run)


def _run(monitor: "Monitor", frames: list[Path], settings: MonitorSettings, watch: bool,
         sinks: Sinks, run: RunInfo) -> dict:
    folder = _FolderWatch(monitor.frames_dir, settings.settle_s)
    started = time.perf_counter()
    clock = _SourceClock()
    with _StopFlag() as stop:
        sinks.start(run)
        try:
            _process_all(monitor, frames, stop, sinks, clock)
            while watch and not stop.stopped:
                _process_all(monitor, folder.ready(), stop, sinks, clock)
                time.sleep(settings.poll_s)
        finally:
            result = monitor.summary(time.perf_counter() - started, interrupted=stop.stopped)
            failure = sys.exc_info()[1]  # the fault that ends the run, told to the sinks (OPC UA Status)
            if failure is not None:
                result["error"] = first_line(failure)
            sinks.close(result)
    return result


class _SourceClock:
    """A frame's source time: the first frame's file time plus the frame's ``time_s``."""

    def __init__(self):
        self.epoch: float | None = None

    def __call__(self, path: Path, record: FrameRecord) -> float:
        if record.time_s is None:  # an unreadable frame has no time of its own: when it was seen
            return time.time()
        if self.epoch is None:
            try:
                self.epoch = path.stat().st_mtime - record.time_s
            except OSError:
                self.epoch = time.time() - record.time_s
        return self.epoch + record.time_s


def _process_all(monitor: Monitor, frames: list[Path], stop: _StopFlag, sinks: Sinks, clock: _SourceClock) -> None:
    for path in frames:
        if stop.stopped:
            return
        record = monitor.process(path)
        alarms = monitor.timeline.alarms
        sinks.frame(FrameSummary(record, clock(path, record),
                                 alarm=alarms[-1] if alarms and alarms[-1]["frame"] == record.frame else None,
                                 alarm_active=record.above >= monitor.settings.rule.frames,
                                 truth_onset_s=monitor.truth_onset_s_relative()))
