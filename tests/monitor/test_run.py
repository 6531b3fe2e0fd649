"""The monitor loop (monitor/run.py) on small generated runs: the alarm, error rows, the output
rule, --watch and SIGINT, ONNX without torch."""

from __future__ import annotations

import csv
import math
import json
import os
import signal
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("scipy")

from crystalscope.cli import app  # noqa: E402
from crystalscope.inference.predictor import Prediction  # noqa: E402
from crystalscope.monitor.frames import ProcessSpec, generate_process  # noqa: E402
from crystalscope.monitor.sinks import FileSink, RunInfo  # noqa: E402
from crystalscope.monitor.run import Monitor, MonitorSettings, run_monitor  # noqa: E402
from crystalscope.monitor.timeline import PARTICLE_COLUMNS  # noqa: E402
from monitor_runs import (MAX_DELAY_S, SMALL, SMALL_MIN_CONFIDENCE, SMALL_RULE, SMALL_RULE_OPTIONS, SRC,  # noqa: E402
                          read_csv)

RUNNER = CliRunner()


def test_alarm_fires_after_the_onset_within_the_stated_delay(tiny_onnx, onset_run, tmp_path):
    out = tmp_path / "monitor"
    result = RUNNER.invoke(app, ["monitor", str(tiny_onnx), str(onset_run / "frames"), "--out", str(out),
                                 "--overlay", *SMALL_RULE_OPTIONS])
    assert result.exit_code == 0, result.output
    alarms = json.loads((out / "alarms.json").read_text())
    assert alarms, "no alarm on a run with PG"
    assert 150.0 <= alarms[0]["time_s"] <= 150.0 + MAX_DELAY_S
    assert alarms[0]["rule"].startswith("ewma")
    timeline = read_csv(out / "timeline.csv")
    assert [int(r["frame"]) for r in timeline] == list(range(30))
    before = [float(r["pg_fraction"]) for r in timeline[:15] if r["pg_fraction"]]
    after = [float(r["pg_fraction"]) for r in timeline[20:] if r["pg_fraction"]]
    assert np.mean(after) > np.mean(before) + 0.2
    for r in timeline:
        if r["pg_fraction"]:
            assert float(r["ci95_low"]) <= float(r["pg_fraction"]) <= float(r["ci95_high"])
    particles = read_csv(out / "particles.csv")
    assert {p["status"] for p in particles} <= {"ok", "out of focus", "uncertain", "cluster"}
    assert sum(p["status"] == "ok" for p in particles) >= 15
    assert Image.open(out / "timeline.png").size[0] > 300
    assert len(list((out / "overlay").glob("*.jpg"))) == 30


def test_no_alarm_on_a_run_without_pg(tiny_onnx, tmp_path):
    run = tmp_path / "run"
    generate_process(run, ProcessSpec(frames=30, pg_onset_s=1e6, seed=8, **SMALL))
    summary = run_monitor(tiny_onnx, run / "frames", tmp_path / "out", MonitorSettings(rule=SMALL_RULE, min_confidence=SMALL_MIN_CONFIDENCE))
    assert summary["n_frames"] == 30 and summary["n_particles"] >= 30
    assert json.loads((tmp_path / "out" / "alarms.json").read_text()) == []


def test_unreadable_frame_becomes_an_error_row(tiny_onnx, onset_run, tmp_path):
    frames = tmp_path / "frames"
    frames.mkdir()
    for path in sorted((onset_run / "frames").iterdir())[:3]:
        shutil.copy(path, frames / path.name)
    (frames / "frame_00001_t000010.00s.png").write_bytes(b"not a png")
    summary = run_monitor(tiny_onnx, frames, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "timeline.csv")
    assert [r["status"].startswith("error") for r in rows] == [False, True, False]
    assert rows[1]["time_s"] == "" and rows[1]["pg_fraction"] == ""  # unreadable: no time
    assert summary["n_frame_errors"] == 1
    # the one output rule: a rerun replaces the earlier output only with force, a folder holding
    # a user's file is never used, and the frames folder is never an output
    from crystalscope.errors import CrystalscopeError

    with pytest.raises(CrystalscopeError, match="--force"):
        run_monitor(tiny_onnx, frames, tmp_path / "out")
    assert run_monitor(tiny_onnx, frames, tmp_path / "out", force=True)["n_frame_errors"] == 1
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(CrystalscopeError, match="did not write"):
        run_monitor(tiny_onnx, frames, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    with pytest.raises(CrystalscopeError, match="input"):
        run_monitor(tiny_onnx, frames, frames / "monitor")


class _FakePredictor:
    """Stands in for Predictor to check how statuses other than ok are counted."""

    class_names = ["cex", "pg"]
    positive_class = "pg"
    backend_name = "fake"
    # ok, a future "rejected" status, a crop error, and an ok call below --min-confidence, in turn
    plan = [("ok", 0.95), ("rejected", 0.7), ("error: bad crop", None), ("ok", 0.5)]
    calls = 0

    def predict(self, items, batch_size=32):
        out = []
        for i, _ in enumerate(items):
            status, confidence = self.plan[self.calls % len(self.plan)]
            self.calls += 1
            out.append(Prediction(path=f"<image {i}>", predicted="pg" if status == "ok" else None,
                                  confidence=confidence, status=status))
        return out


def test_only_ok_particles_count_and_the_others_are_reported(onset_run, tmp_path):
    monitor = Monitor(_FakePredictor(), onset_run / "frames", tmp_path, MonitorSettings(min_sharpness=0.0))
    frames = sorted((onset_run / "frames").iterdir())
    records = [monitor.process(frame) for frame in frames[20:30]]
    statuses = [row[PARTICLE_COLUMNS.index("status")] for row in monitor.particles]
    assert {"ok", "rejected", "error: bad crop", "uncertain"} <= set(statuses)
    assert sum(r.counts["pg"] for r in records) == statuses.count("ok")
    assert sum(r.rejected for r in records) == statuses.count("rejected")
    assert sum(r.errors for r in records) == statuses.count("error: bad crop")
    assert sum(r.uncertain for r in records) == statuses.count("uncertain")
    assert all(r.fraction in (None, 1.0) for r in records)  # only PG was called: fraction 1 or nothing
    rows = read_csv_text(monitor.timeline.csv_text())
    assert sum(int(r["n_particles"]) for r in rows) == len(statuses)


def test_sizes_are_written_in_the_scale_given(onset_run, tmp_path):
    monitor = Monitor(_FakePredictor(), onset_run / "frames", tmp_path, MonitorSettings(min_sharpness=0.0, um_per_px=2.0))
    for frame in sorted((onset_run / "frames").iterdir())[20:26]:
        monitor.process(frame)
    sink = FileSink()
    sink.start(RunInfo("run", onset_run / "frames", tmp_path, monitor.timeline, monitor.particles, monitor.unrecorded))
    sink.close({})
    particles = read_csv(tmp_path / "particles.csv")
    measured = [p for p in particles if p["ecd_um"]]
    assert measured and "ecd_px" not in particles[0]
    for p in measured:  # um: twice the px of a 2 um/px frame; the box bounds the particle
        box_side = max(int(p["x1"]) - int(p["x0"]), int(p["y1"]) - int(p["y0"]))
        assert float(p["width_um"]) <= float(p["length_um"]) <= 2.0 * box_side * 1.5
        # the equivalent circle diameter is that of a disc of the particle's area, in the same unit
        assert float(p["area_um2"]) == pytest.approx(math.pi * (float(p["ecd_um"]) / 2) ** 2, rel=1e-3)
        assert float(p["aspect"]) >= 1.0
    timeline = read_csv(tmp_path / "timeline.csv")
    assert all(r["um_per_px"] == "2" for r in timeline)
    for r in timeline:
        if r["all_ecd_d50_um"]:
            assert float(r["all_ecd_d10_um"]) <= float(r["all_ecd_d50_um"]) <= float(r["all_ecd_d90_um"])
    counts = [sum(int(v) for k, v in r.items() if k.startswith("all_n_ecd_")) for r in timeline]
    assert counts == [int(r["n_measured"]) for r in timeline]
    assert Image.open(tmp_path / "sizes.png").size[0] > 300


def read_csv_text(text: str) -> list[dict]:
    return list(csv.DictReader(text.splitlines()))


def test_monitor_on_onnx_imports_no_torch(tiny_onnx, onset_run, tmp_path):
    code = (
        "import sys; from crystalscope.monitor.run import run_monitor; "
        f"s = run_monitor({str(tiny_onnx)!r}, {str(onset_run / 'frames')!r}, {str(tmp_path / 'out')!r}); "
        "assert s['n_frames'] == 30, s; print('torch' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_watch_processes_frames_copied_in_one_by_one_and_sigint_flushes(tiny_onnx, onset_run, tmp_path):
    frames, out = tmp_path / "incoming", tmp_path / "out"
    frames.mkdir()
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([sys.executable, "-m", "crystalscope", "monitor", str(tiny_onnx), str(frames),
                             "--out", str(out), "--watch",
                             *SMALL_RULE_OPTIONS], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sources = sorted((onset_run / "frames").iterdir())[:6]
    try:
        for path in sources:
            shutil.copy(path, frames / path.name)
            time.sleep(0.3)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (out / "timeline.csv").exists() and len(read_csv(out / "timeline.csv")) == len(sources):
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "(interrupted)" in stdout
    rows = read_csv(out / "timeline.csv")
    assert [r["file"] for r in rows] == [p.name for p in sources]
    assert json.loads((out / "alarms.json").read_text()) == []  # PG starts at 150 s, after these frames
    assert {int(r["frame"]) for r in read_csv(out / "particles.csv")} <= set(range(len(sources)))
    Image.open(out / "timeline.png").verify()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_monitor_errors_are_one_line(tmp_path):
    result = RUNNER.invoke(app, ["monitor", str(tmp_path / "model.onnx"), str(tmp_path / "nowhere"),
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "FRAMES_DIR" in result.output and "Traceback" not in result.output


def test_scale_and_size_class_errors_are_one_line(tmp_path):
    (tmp_path / "frames").mkdir()
    for option, value in (("--um-per-px", "-1"), ("--size-classes", "100,10,4"), ("--size-classes", "x")):
        result = RUNNER.invoke(app, ["monitor", str(tmp_path / "model.onnx"), str(tmp_path / "frames"),
                                     "--out", str(tmp_path / "out"), option, value])
        assert result.exit_code == 2 and option in result.output and "Traceback" not in result.output
        assert not (tmp_path / "out").exists()


def test_frame_time_starts_at_the_first_readable_frame_and_never_goes_back(tmp_path):
    from crystalscope.monitor.run import FrameTimeError

    monitor = Monitor(_FakePredictor(), tmp_path, tmp_path / "out")
    assert monitor.frame_time(tmp_path / "f_t000050.00s.png") == 0.0
    assert monitor.frame_time(tmp_path / "f_t000080.00s.png") == 30.0
    assert monitor.frame_time(tmp_path / "g_t000080.00s.png") == 30.0  # a tie is not going back
    with pytest.raises(FrameTimeError, match="before the frame before it"):
        monitor.frame_time(tmp_path / "f_t000060.00s.png")
    assert monitor.frame_time(tmp_path / "f_t000090.00s.png") == 40.0  # the refused frame moved nothing


def test_folder_watch_retries_a_frame_until_its_size_has_settled(tmp_path):
    from crystalscope.monitor.run import _FolderWatch

    watch = _FolderWatch(tmp_path, settle_s=0.6)
    (tmp_path / "a.png").write_bytes(b"\x89PNG half")  # a copy that stalls
    assert watch.ready() == [] and watch.ready() == []  # same size, but it does not decode yet
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    assert watch.ready() == []  # the size changed: seen again from now
    assert [p.name for p in watch.ready()] == ["a.png"]  # complete: handed out at once
    (tmp_path / "b.png").write_bytes(b"never an image")
    watch.ready()
    time.sleep(0.7)
    assert [p.name for p in watch.ready()] == ["b.png"]  # settled and still unreadable: its error row
