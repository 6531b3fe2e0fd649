"""Scoring a monitored run against synth-process's truth (monitor/score.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("scipy")

from crystalscope.errors import CrystalscopeError  # noqa: E402
from crystalscope.monitor.frames import ProcessSpec, generate_process, read_truth  # noqa: E402
from crystalscope.monitor.score import alarm_scores, match_boxes, score_run  # noqa: E402
from monitor_runs import SMALL  # noqa: E402


def test_match_boxes_pairs_best_first_and_one_to_one():
    true = [(0, 0, 10, 10), (20, 0, 30, 10)]
    detected = [(1, 0, 10, 10), (0, 0, 10, 10), (20, 0, 30, 10), (50, 50, 60, 60)]
    assert sorted(match_boxes(detected, true)) == [(1, 0), (2, 1)]  # the exact box wins over the near one
    assert match_boxes(detected, true, threshold=1.01) == []
    assert match_boxes([], true) == []


def test_alarm_scores_split_detections_from_false_alarms():
    truth = {"onset_s": 100.0, "frames": {0: {"time_s": "40"}, 1: {"time_s": "400"}}}
    # alarm times are seconds since the first frame (40 s here)
    scores = alarm_scores([{"time_s": 20.0}, {"time_s": 90.0}, {"time_s": 200.0}], truth)
    assert scores["false_alarms"] == 1 and scores["onset_delay_s"] == 30.0
    assert scores["in_control_hours"] == pytest.approx(60.0 / 3600)
    quiet = alarm_scores([{"time_s": 5.0}], {"onset_s": None, "frames": truth["frames"]})
    assert quiet["false_alarms"] == 1 and quiet["onset_delay_s"] is None


def _perfect_monitor_output(run: Path, out: Path, alarms: list[dict]) -> None:
    """What a monitor that finds and classifies every true particle would write."""
    truth = read_truth(run / "frames")
    out.mkdir()
    with open(out / "timeline.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["frame", "file", "status", "pg_fraction"])
        for index, row in truth["frames"].items():
            writer.writerow([index, Path(row["file"]).name, "ok", row["pg_fraction"]])
    with open(out / "particles.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "x0", "y0", "x1", "y1", "class", "status"])
        for index, particles in truth["particles"].items():
            name = Path(truth["frames"][index]["file"]).name
            for p in particles:
                writer.writerow([name, p["x0"], p["y0"], p["x1"], p["y1"], p["class"], "ok"])
    (out / "alarms.json").write_text(json.dumps(alarms))


def test_a_perfect_monitor_scores_perfectly(tmp_path):
    generate_process(tmp_path / "run", ProcessSpec(frames=5, pg_onset_s=20.0, pg_max=0.5, pg_rise_s=1e-6,
                                                   seed=4, **SMALL))
    _perfect_monitor_output(tmp_path / "run", tmp_path / "monitor", [{"time_s": 30.0}])
    scores = score_run(tmp_path / "monitor", tmp_path / "run" / "frames")
    assert scores["precision"] == scores["recall"] == scores["accuracy"] == 1.0
    assert scores["true_particles"] >= 5 and scores["fraction_mae"] == 0.0
    assert scores["onset_delay_s"] == 10.0 and scores["false_alarms"] == 0


def test_a_run_without_truth_is_a_one_line_error(tmp_path):
    (tmp_path / "frames").mkdir()
    with pytest.raises(CrystalscopeError, match="no ground truth"):
        score_run(tmp_path / "monitor", tmp_path / "frames")
