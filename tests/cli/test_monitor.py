"""cli/monitor.py: synth-process and monitor at the command line (bad input, help, the summary lines)."""

from __future__ import annotations

import pytest
from cli_checks import error_line, help_text, invoke, tiny_checkpoint


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Two small probe frames written by the command itself."""
    out = tmp_path_factory.mktemp("process") / "run"
    result = invoke("synth-process", out, "--frames", "2", "--width", "256", "--height", "160", "--interval-s", "10")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("wrote 2 frames (256x160) with ")
    assert f"ground truth in {out / 'truth'}" in result.output
    return out / "frames"


@pytest.mark.parametrize("command, options", [
    ("synth-process", ["--frames", "--interval-s", "--pg-onset-s", "--pg-max", "--width", "--height", "--difficulty",
                       "--seed", "--force"]),
    ("monitor", ["--out", "--watch", "--alarm-fraction", "--alarm-frames", "--smoothing", "--detector",
                 "--min-confidence", "--min-sharpness", "--overlay", "--force"]),
])
def test_help_lists_the_key_options(command, options):
    text = help_text(command)
    assert [option for option in options if option not in text] == []


def test_synth_process_writes_frames_named_by_their_time(frames):
    assert sorted(p.name for p in frames.iterdir()) == ["frame_00000_t000000.00s.png", "frame_00001_t000010.00s.png"]


def test_synth_process_with_an_unknown_difficulty_writes_nothing(tmp_path):
    line = error_line(invoke("synth-process", tmp_path / "p", "--frames", "2", "--difficulty", "extreme"))
    assert "--difficulty 'extreme'" in line and not (tmp_path / "p").exists()


def test_synth_process_frames_too_small_for_the_crops_name_the_options(tmp_path):
    line = error_line(invoke("synth-process", tmp_path / "p", "--frames", "2", "--width", "100"))
    assert line.startswith("error: --width/--height 100x768: frames must be at least")


def test_monitor_without_frames_suggests_watch(tmp_path):
    (tmp_path / "frames").mkdir()
    line = error_line(invoke("monitor", tmp_path / "m.onnx", tmp_path / "frames", "--out", tmp_path / "o"))
    assert "no image files" in line and "--watch" in line and not (tmp_path / "o").exists()


def test_monitor_with_a_missing_model_names_it(frames, tmp_path):
    line = error_line(invoke("monitor", tmp_path / "gone.onnx", frames, "--out", tmp_path / "o"))
    assert line == f"error: {tmp_path / 'gone.onnx'}: model file not found"


def test_monitor_needs_an_out_folder(frames, tmp_path):
    result = invoke("monitor", tmp_path / "m.onnx", frames)
    assert result.exit_code == 2 and "--out" in result.output and "Traceback" not in result.output


def test_monitor_prints_the_frames_alarms_and_outputs(frames, tmp_path):
    model = tiny_checkpoint(tmp_path)
    result = invoke("monitor", model, frames, "--out", tmp_path / "o", "--alarm-fraction", "0.5")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[-3].startswith("2 frames (0 unreadable), ") and "particles" in lines[-3]
    assert lines[-2].startswith("alarms (") and "0.5" in lines[-2]
    assert lines[-1].startswith("outputs: ") and "timeline.csv" in lines[-1]
    assert (tmp_path / "o" / "timeline.csv").is_file()
