"""The monitor's sinks (monitor/sinks.py): every frame summary reaches every sink, the files are
written by FileSink, and one sink failing to close does not stop the others."""

from __future__ import annotations

import json

import pytest

from crystalscope.monitor.sinks import FileSink, FrameSummary, RunInfo, Sinks, particles_csv
from crystalscope.monitor.timeline import AlarmRule, FrameRecord, Timeline
from monitor_runs import SMALL_MIN_CONFIDENCE, SMALL_RULE, read_csv


class _Recorder:
    def __init__(self):
        self.events = []

    def start(self, run):
        self.events.append(("start", run))

    def frame(self, summary):
        self.events.append(("frame", summary))

    def close(self, result):
        self.events.append(("close", result))


def _run_info(tmp_path) -> RunInfo:
    timeline = Timeline(["cex", "pg"], "pg", AlarmRule(fraction=0.2, frames=2, smoothing=1.0))
    return RunInfo("batch-7", tmp_path, tmp_path, timeline, [])


def test_file_sink_writes_the_four_outputs_each_frame_or_at_close(tmp_path):
    run = _run_info(tmp_path)
    sink = FileSink(each_frame=False)
    sink.start(run)
    record = run.timeline.add(FrameRecord(0, "f0.png", 0.0, {"cex": 3, "pg": 1}))
    run.particles.append([0, "f0.png", "0.000", 0, 1, 2, 3, 4, "pg", "0.990000", "ok"])
    sink.frame(FrameSummary(record, 100.0, None, False))
    assert not (tmp_path / "timeline.csv").exists()  # one pass: written once, at the end
    sink.close({})
    assert [r["file"] for r in read_csv(tmp_path / "timeline.csv")] == ["f0.png"]
    assert read_csv(tmp_path / "particles.csv")[0]["class"] == "pg"
    assert json.loads((tmp_path / "alarms.json").read_text()) == []
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"

    live = FileSink(each_frame=True)
    live.start(_run_info(tmp_path / "live"))
    live.frame(FrameSummary(live.run.timeline.add(FrameRecord(0, "a.png", 0.0, {"cex": 1})), 0.0, None, False))
    assert len(read_csv(tmp_path / "live" / "timeline.csv")) == 1


def test_every_sink_is_closed_when_one_fails(tmp_path):
    class Broken(_Recorder):
        def close(self, result):
            raise OSError("disk full")

    first, last = _Recorder(), _Recorder()
    sinks = Sinks([first, Broken(), last])
    sinks.start(_run_info(tmp_path))
    with pytest.raises(OSError, match="disk full"):
        sinks.close({"n_frames": 0})
    assert first.events[-1] == ("close", {"n_frames": 0}) and last.events[-1][0] == "close"


def test_particles_csv_has_the_contract_header():
    assert particles_csv([]).splitlines()[0].startswith("frame,file,time_s,particle")


def test_run_monitor_hands_every_frame_to_an_extra_sink(tiny_onnx, onset_run, tmp_path):
    pytest.importorskip("scipy")
    from crystalscope.monitor.run import MonitorSettings, run_monitor

    recorder = _Recorder()
    summary = run_monitor(tiny_onnx, onset_run / "frames", tmp_path / "out",
                          MonitorSettings(rule=SMALL_RULE, min_confidence=SMALL_MIN_CONFIDENCE),
                          sinks=[recorder], run_name="batch-7")
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["start", *["frame"] * 30, "close"]
    assert recorder.events[0][1].name == "batch-7"
    frames = [s for kind, s in recorder.events if kind == "frame"]
    assert [s.record.frame for s in frames] == list(range(30))
    fired = [s.record.frame for s in frames if s.alarm]
    assert fired == [a["frame"] for a in summary["alarms"]] and fired  # the onset run alarms
    assert frames[fired[0]].alarm_active and not frames[0].alarm_active
    steps = [b.source_time - a.source_time for a, b in zip(frames, frames[1:])]
    assert steps == pytest.approx([10.0] * 29)  # frames are named 10 s apart
    assert recorder.events[-1][1]["n_frames"] == 30
