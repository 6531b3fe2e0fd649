"""The live view of a monitored batch (serve/live.py): /api/live reads the monitor's output
folder as it is now, /api/live/overlay serves only that folder's overlay frames, and /live is
the page (its browser test is in test_browser.py)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from crystalscope.errors import CrystalscopeError  # noqa: E402
from crystalscope.monitor.sinks import FileSink, FrameSummary, RunInfo  # noqa: E402
from crystalscope.monitor.timeline import AlarmRule, FrameRecord, Timeline  # noqa: E402
from crystalscope.serve.app import create_app  # noqa: E402
from crystalscope.serve.live import check_monitor_dir, live_state  # noqa: E402


def _monitor_out(folder, frames: list[tuple[int, int]]):
    """A monitor output folder written by the monitor's own FileSink."""
    timeline = Timeline(["cex", "pg"], "pg", AlarmRule(fraction=0.3, frames=2, smoothing=1.0))
    sink = FileSink(each_frame=True)
    sink.start(RunInfo("batch7", folder, folder, timeline, []))
    for i, (cex, pg) in enumerate(frames):
        record = timeline.add(FrameRecord(i, f"f{i}.png", 10.0 * i, {"cex": cex, "pg": pg}))
        sink.frame(FrameSummary(record, 0.0, None, False))
    return timeline


def test_live_state_follows_the_files(tmp_path):
    assert live_state(tmp_path) == {"frames": 0, "rows": [], "alarms": [], "run": None, "watched": None,
                                    "class_names": [], "limit": None, "rule": None, "overlay": None}
    timeline = _monitor_out(tmp_path, [(9, 0), (5, 5), (4, 6)])
    state = live_state(tmp_path)
    assert state["frames"] == 3 and state["run"] == "batch7" and state["limit"] == 0.3
    assert [float(r["pg_fraction"]) for r in state["rows"]] == pytest.approx([0.0, 0.5, 0.6])
    assert state["alarms"] == timeline.alarms and state["alarms"][0]["frame"] == 2
    assert [r["frame"] for r in live_state(tmp_path, since=2)["rows"]] == ["2"]


def test_live_routes_serve_the_folder_and_nothing_else(tmp_path, predictor):
    _monitor_out(tmp_path, [(3, 1)])
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "f0.jpg").write_bytes(b"\xff\xd8 a jpeg")
    (tmp_path / "secret.jpg").write_bytes(b"not an overlay")
    client = TestClient(create_app(predictor, monitor_dir=tmp_path))
    assert "live.js" in client.get("/live").text
    state = client.get("/api/live").json()
    assert state["overlay"] == "f0.jpg" and state["frames"] == 1
    assert client.get("/api/live/overlay/f0.jpg").content == b"\xff\xd8 a jpeg"
    for name in ("..%2Fsecret.jpg", "secret.jpg", "f0.png"):
        assert client.get(f"/api/live/overlay/{name}").status_code == 404
    assert client.get("/live").status_code == 200
    assert TestClient(create_app(predictor)).get("/api/live").status_code == 404  # only with --monitor


def test_a_token_guards_the_live_data(tmp_path, predictor):
    client = TestClient(create_app(predictor, token="t0k", monitor_dir=tmp_path))
    assert client.get("/api/live").status_code == 401
    assert client.get("/api/live", headers={"Authorization": "Bearer t0k"}).json()["frames"] == 0


def test_a_missing_monitor_folder_is_one_line(tmp_path):
    with pytest.raises(CrystalscopeError, match="--monitor .*folder not found"):
        check_monitor_dir(tmp_path / "nowhere")
    assert json.loads(json.dumps(live_state(tmp_path)))["rows"] == []
